"""`prism`: serve a tier, serve all of them, chat, or run the demo.

    prism serve vision  --model PATH [--device cuda:1] --port P
    prism serve llm     --model PATH [--vision HOST:PORT] [--tp N] --port P
    prism serve gateway --model PATH --llm HOST:PORT --port P
    prism serve all     --model PATH --port P      (all tiers in one process)
    prism chat          --model PATH | grpc://HOST:PORT
    prism demo
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def _announce(tier: str, host: str):
    def on_started(port: int) -> None:
        print(f"prism {tier} serving on {host}:{port}", flush=True)

    return on_started


def _vision_config(args):
    from vision_service.config import VisionConfig

    return VisionConfig(max_batch_size=args.vision_max_batch_size, batch_window_ms=args.batch_window_ms,
                        device=args.device, dtype=args.dtype)


def _engine_config(args):
    from llm_service.config import TurbomindEngineConfig

    return TurbomindEngineConfig(
        tp=args.tp, session_len=args.session_len, max_batch_size=args.max_batch_size,
        cache_max_entry_count=args.cache_max_entry_count, cache_block_seq_len=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching, max_prefill_token_num=args.max_prefill_token_num,
        device=args.device, dtype=args.dtype, quant_policy=args.quant_policy,
    )


def _template_config(args):
    if not args.chat_template:
        return None
    from gateway.templates import ChatTemplateConfig

    return ChatTemplateConfig(model_name=args.chat_template)


async def _serve_all(args) -> None:
    """llm (with the vision engine in-process) on a loopback port, gateway on --port."""
    from gateway.server import serve as serve_gateway
    from llm_service.server import serve as serve_llm

    llm_port: asyncio.Future = asyncio.get_running_loop().create_future()
    llm_task = asyncio.create_task(serve_llm(args.model, _engine_config(args), None, bind="127.0.0.1:0",
                                             on_started=llm_port.set_result))
    done, _ = await asyncio.wait({llm_task, llm_port}, return_when=asyncio.FIRST_COMPLETED)
    if llm_task in done:
        llm_task.result()
        return
    gateway_task = asyncio.create_task(serve_gateway(
        args.model, f"127.0.0.1:{llm_port.result()}", _template_config(args), bind=f"{args.host}:{args.port}",
        on_started=_announce("all", args.host), allow_local_files=args.allow_local_files))
    try:  # the LLM tier may stop first (a tensor-parallel worker died): exit with its error
        done, _ = await asyncio.wait({llm_task, gateway_task}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in (gateway_task, llm_task):
            task.cancel()
        await asyncio.gather(gateway_task, llm_task, return_exceptions=True)


def _serve(args) -> None:
    if args.tier == "vision":
        from vision_service.server import serve

        coro = serve(args.model, _vision_config(args), bind=f"{args.host}:{args.port}",
                     on_started=_announce("vision", args.host))
    elif args.tier == "llm":
        from llm_service.server import serve

        coro = serve(args.model, _engine_config(args), args.vision, bind=f"{args.host}:{args.port}",
                     on_started=_announce("llm", args.host))
    elif args.tier == "gateway":
        if not args.llm:
            raise SystemExit("prism serve gateway needs --llm HOST:PORT")
        from gateway.server import serve

        coro = serve(args.model, args.llm, _template_config(args), bind=f"{args.host}:{args.port}",
                     on_started=_announce("gateway", args.host), allow_local_files=args.allow_local_files)
    else:
        coro = _serve_all(args)
    asyncio.run(coro)


def _chat(args) -> None:
    from gateway import GenerationConfig, pipeline
    from gateway.vl import load_image

    pipe = pipeline(args.target, chat_template_config=_template_config(args))
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    print("Type a message; '/image PATH_OR_URL' attaches an image to the next message; '/exit' quits.")
    session, images = None, []
    for line in sys.stdin:
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line.startswith("/image "):
            try:
                images.append(load_image(line[len("/image "):].strip()))
            except ValueError as err:
                print(f"error: {err}")
            continue
        if not line:
            continue
        prompt = (line, images) if images else line
        images = []
        try:
            session = pipe.chat(prompt, session=session, gen_config=gen)
            print(session.response.text, flush=True)
        except ValueError as err:
            print(f"error: {err}")
    pipe.close()


def _demo(args) -> None:
    from gateway.demo import run_demo

    run_demo(args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve one tier (or all) over gRPC")
    serve.add_argument("tier", choices=["vision", "llm", "gateway", "all"])
    serve.add_argument("--model", required=True, help="checkpoint folder (HF layout)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    serve.add_argument("--vision", default=None, help="llm: vision tier HOST:PORT (default: in-process)")
    serve.add_argument("--llm", default=None, help="gateway: llm tier HOST:PORT")
    serve.add_argument("--chat-template", default=None, help="template name, e.g. llava-v1, vicuna")
    serve.add_argument("--allow-local-files", action="store_true",
                       help="gateway: let image URLs name files on the gateway host (off: only http(s)/data)")
    serve.add_argument("--tp", type=int, default=1)
    serve.add_argument("--session-len", type=int, default=None)
    serve.add_argument("--max-batch-size", type=int, default=None)
    serve.add_argument("--cache-max-entry-count", type=float, default=0.8)
    serve.add_argument("--block-size", type=int, default=64)
    serve.add_argument("--max-prefill-token-num", type=int, default=8192, help="prefill tokens per step (chunked prefill)")
    serve.add_argument("--enable-prefix-caching", action="store_true")
    serve.add_argument("--quant-policy", type=int, default=0, choices=[0, 8],
                       help="KV cache: 0 in the model's dtype, 8 int8 (half the bytes; 4, int4, is not supported)")
    serve.add_argument("--vision-max-batch-size", "--max-vision-batch-size", type=int, default=8)
    serve.add_argument("--batch-window-ms", type=float, default=2.0)
    serve.set_defaults(func=_serve)

    chat = sub.add_parser("chat", help="interactive chat with a model folder or a running gateway")
    chat.add_argument("target", help="model folder or grpc://HOST:PORT")
    chat.add_argument("--chat-template", default=None)
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.set_defaults(func=_chat)

    demo = sub.add_parser("demo", help="build the tiny random-weight demo model and run it embedded and split")
    demo.add_argument("--model", default=None, help="use this checkpoint instead of the tiny one")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
