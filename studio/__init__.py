"""The editing studio (Gradio): `build_ui` (layout + wiring), `Studio` (the handlers), projects on disk."""

from .session import Studio
from .ui import build_ui, launch_studio

__all__ = ["Studio", "build_ui", "launch_studio"]
