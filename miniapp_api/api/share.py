"""The landing page behind a poster's fallback QR code, for phones that scan it outside WeChat.

Images are owner-only, so the page shows none: it only says how to open the mini-program. It answers the same for
every id, so it reveals nothing about which images exist.
"""
from __future__ import annotations

from flask import Blueprint, render_template_string

from miniapp_api.api.requests import services

bp = Blueprint("share", __name__)

PAGE = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{{ name }}</title>
<style>body{font-family:sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem;color:#333;text-align:center}
h1{font-size:1.4rem}p{line-height:1.6}</style></head>
<body><h1>{{ name }}</h1>
<p>请在微信中打开：搜索小程序「{{ name }}」，制作你的 AI 写真。</p>
<p lang="en">Open WeChat and search for the mini-program “{{ name }}” to make your own AI portraits.</p>
<p><small>本页面图片均由 AI 生成 · AI-generated content</small></p></body></html>"""


@bp.get("/s/<share_id>")
def landing(share_id):
    return render_template_string(PAGE, name=services().settings.provider_name), 200, {
        "Cache-Control": "public, max-age=3600"}
