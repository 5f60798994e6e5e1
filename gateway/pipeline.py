"""LMDeploy's VLM pipeline face: `pipeline(model_path)` or `pipeline('grpc://host:port')`.

An asyncio loop runs in a daemon thread; the blocking methods submit coroutines to it.
A lone conversation is prepared (rendered, tokenized, images loaded) on the calling
thread first; a batch is submitted all at once so the LLM engine's continuous batching sees
every request, its conversations prepared one at a time in order (service.prepare_in_order):
the first ones are in the LLM tier while later ones are prepared. Embedded mode builds the
vision engine, the LLM engine and a ChatService in this process; 'grpc://' mode talks to a
running gateway with the same API and results. Response.logits is a torch tensor when torch
is importable (as LMDeploy returns), else the numpy array.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from gateway.config import GenerationConfig, Response, TurbomindEngineConfig, VisionConfig
from gateway.messages import normalize_messages, normalize_prompts
from gateway.service import ChatService, collect
from gateway.templates import ChatTemplateConfig
from protos.serving import freeze_startup_heap, thaw_heap

_IGNORED_KWARGS = ("trust_remote_code", "max_log_len")  # LMDeploy options with no meaning here
_DONE = object()
_session_ids = itertools.count(1)


@dataclass
class Session:
    """A multi-turn chat: each turn re-sends the whole history (images included), so
    the LLM tier's embedding and prefix caches make the repeat cheap."""

    session_id: int = field(default_factory=lambda: next(_session_ids))
    prompt: Any = None
    response: Response | None = None
    history: list[tuple[Any, str]] = field(default_factory=list)
    gen_config: GenerationConfig | None = None

    def messages(self, prompt) -> list[dict]:
        messages: list[dict] = []
        for past, answer in self.history:
            messages += normalize_messages(past) + [{"role": "assistant", "content": answer}]
        return messages + normalize_messages(prompt)


class _LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="prism-pipeline", daemon=True)
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro):
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt included: stop the work too
            future.cancel()
            raise

    def stop(self) -> None:
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def _with_torch_logits(response: Response) -> Response:
    if response.logits is not None:
        try:
            import torch
        except ImportError:
            return response
        response.logits = torch.from_numpy(response.logits)
    return response


class Pipeline:
    def __init__(self, model_path: str, backend_config=None, chat_template_config: ChatTemplateConfig | None = None,
                 vision_config: VisionConfig | None = None):
        self.model_path = model_path
        self._thread = _LoopThread()
        self._closers: list = []  # what close() must stop, in order
        self._limit = getattr(backend_config, "max_batch_size", None)  # LMDeploy's request limiter
        try:
            self._service = self._thread.run(self._build(backend_config, chat_template_config, vision_config))
        except BaseException:
            self.close()
            raise
        freeze_startup_heap()

    async def _build(self, backend_config, chat_template_config, vision_config):
        self._semaphore = asyncio.Semaphore(self._limit) if self._limit else None
        if self.model_path.startswith("grpc://"):
            from gateway.client import GatewayClient

            client = GatewayClient(self.model_path, chat_template_config)
            self._closers.append(client.close)
            return client
        from llm_service.engine import AsyncLLMEngine
        from vision_service.engine import VisionEngine

        service = ChatService(self.model_path, None, chat_template_config)  # fail fast on the template
        vision = VisionEngine(self.model_path, vision_config or VisionConfig())
        self._closers.append(vision.close)
        service.llm = AsyncLLMEngine(self.model_path, backend_config or TurbomindEngineConfig(), vision=vision)
        self._closers.insert(0, service.llm.close)  # the LLM engine first: it may still call the vision engine
        return service

    def _gen_configs(self, gen_config, n: int) -> list[GenerationConfig]:
        if isinstance(gen_config, (list, tuple)):
            if len(gen_config) != n:
                raise ValueError(f"{len(gen_config)} gen_configs for {n} prompts")
            return [g or GenerationConfig() for g in gen_config]
        return [gen_config or GenerationConfig()] * n

    def _prepare_lone(self, conversations, configs, do_preprocess) -> list:
        """A lone conversation is prepared here, on the calling thread, which would only wait
        otherwise: two thread hops fewer (to the prepare pool and back) in the fixed cost
        of every single request, a follow-up chat turn's included. The conversations of a
        batch are prepared by the service's stream, in order (None here)."""
        if len(conversations) != 1:
            return [None] * len(conversations)
        return [self._service.prepare(conversations[0], configs[0], do_preprocess=do_preprocess)]

    def _stream(self, messages, gen_config, index, do_preprocess, prepared):
        if prepared is not None:
            return self._service.stream_prepared(prepared, index)
        return self._service.stream(messages, gen_config, index=index, do_preprocess=do_preprocess)

    async def _one(self, messages, gen_config, index, do_preprocess, prepared=None) -> Response:
        async with self._semaphore or contextlib.nullcontext():
            return await collect(self._stream(messages, gen_config, index, do_preprocess, prepared))

    async def _all(self, conversations, configs, do_preprocess, progress, prepared) -> list[Response]:
        tasks = [asyncio.ensure_future(self._one(m, g, i, do_preprocess, p))
                 for i, (m, g, p) in enumerate(zip(conversations, configs, prepared))]
        if progress is not None:
            for task in tasks:
                task.add_done_callback(lambda _: progress.update(1))
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    def infer(self, prompts, gen_config=None, do_preprocess: bool = True, adapter_name: str | None = None,
              use_tqdm: bool = False):
        """A Response for one prompt, a list of them (in order, `.index` set) for a batch."""
        if adapter_name is not None:
            raise ValueError("adapters are not supported")
        conversations, is_batch = normalize_prompts(prompts)
        configs = self._gen_configs(gen_config, len(conversations))
        prepared = self._prepare_lone(conversations, configs, do_preprocess)
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(conversations))
        try:
            responses = self._thread.run(self._all(conversations, configs, do_preprocess, progress, prepared))
        finally:
            if progress is not None:
                progress.close()
        responses = [_with_torch_logits(r) for r in responses]
        return responses if is_batch else responses[0]

    __call__ = infer

    def stream_infer(self, prompts, sessions=None, gen_config=None, do_preprocess: bool = True,
                     adapter_name: str | None = None, stream_response: bool = True) -> Iterator[Response]:
        """Delta Responses of every prompt as they come; `.index` says whose."""
        if sessions is not None or adapter_name is not None:
            raise ValueError("stream_infer supports neither sessions nor adapters; use chat() for sessions")
        conversations, _ = normalize_prompts(prompts)
        configs = self._gen_configs(gen_config, len(conversations))
        prepared = self._prepare_lone(conversations, configs, do_preprocess)
        deltas: queue.SimpleQueue = queue.SimpleQueue()

        async def one(messages, config, index, ready):
            async for delta in self._stream(messages, config, index, do_preprocess, ready):
                deltas.put(delta)

        async def produce():
            try:
                tasks = [asyncio.ensure_future(one(m, g, i, p))
                         for i, (m, g, p) in enumerate(zip(conversations, configs, prepared))]
                try:
                    await asyncio.gather(*tasks)
                except BaseException:
                    for task in tasks:
                        task.cancel()
                    raise
            except Exception as err:  # handed to the consumer
                deltas.put(err)
            finally:
                deltas.put(_DONE)

        future = self._thread.submit(produce())
        try:
            while (item := deltas.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield _with_torch_logits(item)
        finally:
            future.cancel()  # the consumer stopped early: abort what still runs

    def chat(self, prompt, session: Session | None = None, gen_config: GenerationConfig | None = None,
             do_preprocess: bool = True) -> Session:
        """One turn; the Session keeps the history and the latest Response."""
        session = session or Session()
        messages = session.messages(prompt)
        config = gen_config or GenerationConfig()
        prepared = self._service.prepare(messages, config, do_preprocess=do_preprocess)  # see _prepare_lone
        response = self._thread.run(self._one(messages, config, 0, do_preprocess, prepared))
        session.prompt, session.response, session.gen_config = prompt, _with_torch_logits(response), gen_config
        session.history.append((prompt, response.text))
        return session

    def close(self) -> None:
        """Stop the engines (or close the connection) and the loop thread. Idempotent."""
        if self._thread is None:
            return
        closers, self._closers = self._closers, []

        async def close_all():
            for close in closers:
                if asyncio.iscoroutine(result := close()):
                    await result

        try:
            self._thread.run(close_all())
        finally:
            self._thread.stop()
            self._thread = None
            self._service = None
            thaw_heap()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pipeline(model_path: str, backend_config=None, chat_template_config: ChatTemplateConfig | None = None,
             vision_config: VisionConfig | None = None, log_level: str = "WARNING", **kwargs) -> Pipeline:
    """LMDeploy's `pipeline`: a model folder (embedded) or 'grpc://host:port' (a gateway)."""
    unknown = sorted(set(kwargs) - set(_IGNORED_KWARGS))
    if unknown:
        raise TypeError(f"pipeline() got unexpected keyword arguments {unknown}")
    for name in ("gateway", "llm_service", "vision_service"):
        logging.getLogger(name).setLevel(log_level.upper() if isinstance(log_level, str) else log_level)
    return Pipeline(str(model_path), backend_config, chat_template_config, vision_config)
