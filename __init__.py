"""ComfyUI entry point of the FLUX.2 LoRA Trainer pack.

ComfyUI imports this folder as a package and calls `comfy_entrypoint`. Everything here stays
lazy: importing the pack outside ComfyUI (tests, tools, a plain `import`) must not fail and must
not pull in torch or ComfyUI, so the node modules are imported only when ComfyUI asks for them.
No NODE_CLASS_MAPPINGS on purpose: if both exist, ComfyUI loads V1 and ignores the V3 nodes.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import Flux2LoraExtension

    return Flux2LoraExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
