"""``crcm play``: a web page that plays a world model, served by FastAPI over a websocket.

Every connection is one :class:`crcm.Session` of a shared :class:`crcm.Runtime` per model, so
all players are batched into the same forwards. See ``docs/play.md`` for the protocol.
"""

from crcm.serve.app import (
    FRAME_HEADER,
    ModelEntry,
    PlayServer,
    ServeConfig,
    ServerThread,
    create_app,
    decode_frame,
    resolve_model,
)

__all__ = [
    "FRAME_HEADER",
    "ModelEntry",
    "PlayServer",
    "ServeConfig",
    "ServerThread",
    "create_app",
    "decode_frame",
    "resolve_model",
]
