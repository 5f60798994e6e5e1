"""The placeholder users write where an image goes in a prompt (LMDeploy's name and value)."""

IMAGE_TOKEN = "<IMAGE_TOKEN>"
