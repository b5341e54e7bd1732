"""The ComfyUI nodes of the pack: thin V3 wrappers, one engine call each.

This package is the only code that may import ComfyUI (`comfy`, `comfy_api`, `folder_paths`,
`server`). It is loaded relatively from the pack folder and must never be installed as a
top-level `nodes` package, which would shadow ComfyUI's own `nodes` module. ComfyUI imports it at
start, so node modules import the engine where it is used, not at the top: only what their classes
and schemas need (errors, config) loads with the pack.
"""

from __future__ import annotations

import sys

from comfy_api.latest import ComfyExtension, io

from .dataset_nodes import LoadDataset, ValidateDataset
from .training_nodes import CacheLatents, ConfigureLora, LoadTrainingModel, SaveLora, Train


class Flux2LoraExtension(ComfyExtension):
    async def on_load(self) -> None:
        # The "Stop and save" button's route (ComfyUI adds its routes to the app after loading packs). Only where
        # ComfyUI's web server is loaded already: importing it here would cost a tool that loads the nodes alone
        # most of a second (aiohttp, sqlalchemy, ...) for a route nobody can call.
        if "server" in sys.modules:
            from .events import add_routes

            add_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadDataset, ValidateDataset, LoadTrainingModel, CacheLatents, ConfigureLora, Train, SaveLora]


__all__ = ["Flux2LoraExtension"]
