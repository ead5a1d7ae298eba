"""The Gradio layout, declared once; every event handler lives in `app.handlers` as a plain function."""
from __future__ import annotations

import gradio as gr

from app import handlers
from app.service import StudioService


def build_app(service: StudioService) -> gr.Blocks:
    with gr.Blocks(title="MoRA Studio") as app:
        gr.Markdown("# MoRA Studio")
        with gr.Tab("Runs"):
            runs_table = gr.Dataframe(headers=list(handlers.RUN_COLUMNS), interactive=False, label="Runs")
        timer = gr.Timer(1.0)
        timer.tick(lambda: handlers.runs_table(service), outputs=runs_table)
        app.load(lambda: handlers.runs_table(service), outputs=runs_table)
    return app
