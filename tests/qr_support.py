"""Reading back the QR codes our posters and the simulator draw (as the WeChat app would: wechat_sim.scan)."""
from __future__ import annotations

from wechat_sim.scan import decode_qr, scanned_scene

__all__ = ["decode_qr", "scanned_scene"]
