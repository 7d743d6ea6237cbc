"""What the WeChat app does with a mini-program code the simulator drew: it reads it (the simulator draws a QR code of
`page?scene=...` where WeChat draws its round code), and opens the page with the scene."""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
from PIL import Image


def decode_qr(image: Image.Image) -> str:
    """The text of the QR code in `image`, or "" when none reads.

    OpenCV's classic detector misses about one code in 400 of the ones we draw (depending on the content); the
    ArUco-based one read 3,000 of 3,000 here. Both are tried, so a caller fails only when the code is really
    unreadable.
    """
    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    for detector in (cv2.QRCodeDetectorAruco(), cv2.QRCodeDetector()):
        text = detector.detectAndDecode(bgr)[0]
        if text:
            return text
    return ""


def scanned_scene(image: Image.Image) -> str:
    """The scene a scan of this code opens the mini-program with ("" when no code reads)."""
    return parse_qs(urlsplit(decode_qr(image)).query).get("scene", [""])[0]
