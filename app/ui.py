"""The Gradio layout, declared once, one function per tab. Handlers are plain functions in the `app` view modules;
nothing here runs long work: training and generation happen on workers, the page polls the store."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app import (bench, chat_view, datasets, eval_view, export_view, runs_dashboard, runs_view, settings,
                 system_view, train_view)
from app.service import ServiceError, StudioService
from storage.repo import STATUSES, StorageError
from workers.data_readers import FORMATS
from workers.formatting import format_parameters
from workers.models import list_models
from mora.variants import variant_names
from workers.train_config import ADAPTERS, DTYPES, QUANTIZATIONS, SCHEDULES, ConfigError

CSS = """
.trained { background: #fde68a; border-radius: 2px; }
.example pre { white-space: pre-wrap; font-size: 0.85em; }
.example-title { font-weight: 600; margin-top: 0.5em; }
.legend { font-size: 0.85em; }
""" + eval_view.CSS
FRIENDLY_ERRORS = (ConfigError, ServiceError, StorageError, ValueError)


def _model_choices() -> list[tuple[str, str]]:
    return [(f"{m.name} ({format_parameters(m.parameters)})", m.name) for m in list_models()]


def _dataset_choices(service: StudioService) -> list[tuple[str, int]]:
    return [(f"{d.name} · {d.rows} rows · {d.schema}", d.id) for d in service.datasets()]


def _default_model() -> str | None:
    """The first model ready to use; the default model (converted on first use) when none is."""
    models = list_models()
    candidates = [m for m in models if m.prepared] or models
    return candidates[0].name if candidates else None


def data_tab(service: StudioService) -> dict[str, Any]:
    with gr.Tab("Data", id="data") as tab:
        gr.Markdown("Upload a dataset: chat `messages`, ShareGPT `conversations`, alpaca `instruction`/`output`, "
                    "`prompt`/`completion`, or raw `text`, as " + ", ".join(FORMATS) + ".")
        with gr.Row():
            upload = gr.File(label="Dataset file", file_types=list(FORMATS), type="filepath", elem_id="upload")
            with gr.Column():
                message = gr.Markdown(elem_id="upload-message")
                preview_model = gr.Dropdown(_model_choices(), value=_default_model(), label="Preview with model")
        preview = gr.HTML(elem_id="preview")
        table = gr.Dataframe(headers=["id", "name", "format", "schema", "rows", "size", "uploaded"],
                             value=service.datasets_table, interactive=False,
                             label="Stored datasets")
        with gr.Row():
            to_delete = gr.Dropdown(_dataset_choices(service), label="Dataset (choose one to preview it)", scale=3)
            delete = gr.Button("Delete dataset", variant="stop", scale=1)

    def on_upload(path, model):
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            result = service.upload_dataset(Path(path), Path(path).name)
        finally:
            datasets.discard_upload(Path(path))
        html = chat_view.preview_for(result.dataset, model) if result.dataset else ""
        note = ("✅ " if result.dataset else "⚠️ ") + result.message
        return (note, html, service.datasets_table(),
                gr.Dropdown(choices=_dataset_choices(service), value=result.dataset.id if result.dataset else None))

    def on_delete(dataset_id):
        if dataset_id is None:
            return "Choose a dataset to delete.", gr.skip(), gr.skip()
        try:
            note = service.delete_dataset(int(dataset_id))
        except FRIENDLY_ERRORS as error:
            note = f"⚠️ {error}"
        return note, service.datasets_table(), gr.Dropdown(choices=_dataset_choices(service), value=None)

    def on_show(dataset_id, model):
        """Preview a stored dataset (or the same one with another model's chat template)."""
        if dataset_id is None:
            return gr.skip()
        try:
            return chat_view.preview_for(service.dataset(int(dataset_id)), model)
        except FRIENDLY_ERRORS as error:
            return f"<p>⚠️ {error}</p>"

    upload.upload(on_upload, [upload, preview_model], [message, preview, table, to_delete])
    to_delete.change(on_show, [to_delete, preview_model], preview)
    preview_model.change(on_show, [to_delete, preview_model], preview)
    delete.click(on_delete, [to_delete], [message, table, to_delete])
    return {"tab": tab, "table": table, "to_delete": to_delete}


def _device_choices(service: StudioService) -> tuple[Any, Any]:
    """The devices slider and the quantisation choice, offered only where a connected training worker has them: up
    to the most GPUs one worker holds, NF4/int8 where a worker can load a quantised base (a CUDA GPU with
    bitsandbytes). With neither, both stay hidden and runs take one device and a full-precision base."""
    offered = service.training_capabilities()
    devices, quantized = offered["max_devices"], offered["quantization"]
    return (gr.Slider(visible=devices > 1, maximum=max(devices, 2), value=1),
            gr.Dropdown(visible=bool(quantized), choices=["none", *quantized], value="none"))


def train_tab(service: StudioService) -> dict[str, Any]:
    form: dict[str, gr.components.Component] = {}
    with gr.Tab("Train", id="train") as tab:
        with gr.Row():
            form["model"] = gr.Dropdown(_model_choices(), value=_default_model(), label="Base model")
            dataset = gr.Dropdown(_dataset_choices(service), label="Dataset", elem_id="train-dataset")
        with gr.Row():
            form["adapter"] = gr.Radio(list(ADAPTERS), value="mora", label="Adapter", elem_id="adapter")
            form["r"] = gr.Slider(1, 512, value=8, step=1, label="r (LoRA-equivalent rank)", elem_id="rank")
            form["variant"] = gr.Dropdown([train_view.AUTO, *variant_names()], value=train_view.AUTO,
                                          label="MoRA variant")
        defaults = gr.Markdown(train_view.defaults_note("mora", 8, None), elem_id="defaults")
        budget = gr.Markdown(elem_id="budget")
        with gr.Row():
            form["learning_rate"] = gr.Number(value=0, label="Learning rate (0: the paper's default)",
                                                elem_id="learning-rate")
            form["max_steps"] = gr.Number(value=100, precision=0, label="Max steps (-1: use epochs)",
                                            elem_id="max-steps")
            form["epochs"] = gr.Number(value=1.0, label="Epochs")
            form["batch_size"] = gr.Number(value=4, precision=0, label="Batch size", elem_id="batch-size")
            form["max_length"] = gr.Number(value=512, precision=0, label="Max length (tokens)",
                                             elem_id="max-length")
            form["seed"] = gr.Number(value=0, precision=0, label="Seed")
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                form["lr_scheduler"] = gr.Dropdown(list(SCHEDULES), value="cosine", label="Schedule")
                form["warmup_ratio"] = gr.Number(value=0.03, label="Warm-up fraction")
                form["grad_accum"] = gr.Number(value=1, precision=0, label="Gradient accumulation")
                form["weight_decay"] = gr.Number(value=0.0, label="Weight decay")
                form["dropout"] = gr.Number(value=0.0, label="Adapter dropout")
            with gr.Row():
                form["eval_fraction"] = gr.Number(value=0.0, label="Eval fraction")
                form["eval_steps"] = gr.Number(value=0, precision=0, label="Eval every N steps")
                form["eval_generate_steps"] = gr.Number(value=0, precision=0,
                                                        label="Answer and score prompts every N steps (0: off)")
                form["save_steps"] = gr.Number(value=25, precision=0, label="Checkpoint every N steps")
                form["logging_steps"] = gr.Number(value=1, precision=0, label="Log every N steps")
                form["gradient_checkpointing"] = gr.Checkbox(False, label="Gradient checkpointing")
            with gr.Row():
                form["remora_steps"] = gr.Number(value=0, precision=0, label="ReMoRA every N steps (sharing)")
                form["remora_warmup"] = gr.Number(value=50, precision=0, label="ReMoRA re-warm-up steps")
                form["lora_alpha"] = gr.Number(value=0, label="LoRA alpha (0: max(16, r/2))")
                form["use_rslora"] = gr.Checkbox(False, label="rsLoRA scaling")
                form["target_modules"] = gr.Textbox(label="Target modules (comma-separated; blank: all)")
                form["dtype"] = gr.Dropdown(list(DTYPES), value="auto", label="Precision")
            with gr.Row():  # shown only when a connected training worker has several GPUs or can quantise
                form["devices"] = gr.Slider(1, 2, value=1, step=1, label="Devices for one run (DDP)",
                                            visible=False, elem_id="devices")
                form["quantization"] = gr.Dropdown(list(QUANTIZATIONS), value="none", visible=False,
                                                   label="Quantised base (QLoRA / QMoRA)", elem_id="quantization")
        form["name"] = gr.Textbox(label="Run name (optional)", elem_id="run-name")
        with gr.Row():
            launch = gr.Button("Launch run", variant="primary", elem_id="launch")
            pair = gr.Button("Compare MoRA and LoRA at this budget", elem_id="launch-pair")
        memory = gr.Markdown(elem_id="memory-estimate")
        launched = gr.Markdown(elem_id="launch-message")
        with gr.Accordion("Presets", open=False):
            with gr.Row():
                preset_name = gr.Textbox(label="Preset name")
                save = gr.Button("Save preset")
                preset = gr.Dropdown(train_view.list_presets(settings.presets_dir()), label="Saved presets")
                load = gr.Button("Load preset")
            preset_message = gr.Markdown()
        with gr.Accordion("Reproduce the paper: MoRA memorises what LoRA cannot (UUID pairs)", open=False):
            offered = bench.offered_presets(m.name for m in list_models())
            with gr.Row():
                paper_preset = gr.Dropdown(offered, value=offered[0], label="Preset", elem_id="paper-preset")
                paper_seeds = gr.Number(value=3, precision=0, minimum=1, maximum=bench.MAX_SEEDS,
                                        label=f"Seeds (1–{bench.MAX_SEEDS})", elem_id="paper-seeds")
                paper_ablation = gr.Checkbox(False, label="Table 4 ablation (compression variants) instead",
                                             elem_id="paper-ablation")
            paper_description = gr.Markdown(bench.get_preset(offered[0]).description)
            paper_launch = gr.Button("Launch the whole set", elem_id="launch-paper")
            paper_message = gr.Markdown(elem_id="paper-message")

    names = list(form)
    components = [form[n] for n in names]

    def values_of(args) -> dict[str, Any]:
        return dict(zip(names, args))

    def on_rank_change(adapter, r, variant, model):
        return train_view.defaults_note(adapter, r, variant), train_view.budget_markdown(model, r, variant, adapter)

    def launcher(pair: bool):
        def on_click(dataset_id, *args):
            try:
                runs = train_view.launch_from_form(service, values_of(args), dataset_id, pair=pair)
            except FRIENDLY_ERRORS as error:
                return f"⚠️ {error}"
            names = " and ".join(f"**{r.name}** (`{r.id}`)" for r in runs)
            return f"✅ queued {'the pair ' if pair else ''}{names} — follow it in the Runs tab."

        return on_click

    def on_save(name, *args):
        try:
            train_view.save_preset(settings.presets_dir(), name, values_of(args))
        except FRIENDLY_ERRORS as error:
            return f"⚠️ {error}", gr.skip()
        return f"Saved preset **{name}**.", gr.Dropdown(choices=train_view.list_presets(settings.presets_dir()))

    def on_load(name):
        try:
            values = train_view.load_preset(settings.presets_dir(), name or "")
        except FRIENDLY_ERRORS as error:
            return [f"⚠️ {error}"] + [gr.skip()] * len(components)
        return [f"Loaded preset **{name}**."] + [values.get(n, gr.skip()) for n in names]

    def on_paper(preset_name, seeds, ablation):
        try:
            group = bench.submit_benchmark(service, preset_name, int(seeds or 0), bool(ablation))
        except FRIENDLY_ERRORS as error:
            return f"⚠️ {error}"
        return f"✅ queued the group **{group}**; its curves appear in the Runs tab and its table under Paper results."

    paper_preset.change(lambda name: bench.get_preset(name).description, paper_preset, paper_description)
    paper_launch.click(on_paper, [paper_preset, paper_seeds, paper_ablation], paper_message)
    for trigger in (form["adapter"], form["r"], form["variant"], form["model"]):
        trigger.change(on_rank_change, [form["adapter"], form["r"], form["variant"], form["model"]],
                       [defaults, budget], show_progress="hidden")
    for name in train_view.MEMORY_FIELDS:
        form[name].change(lambda *args: train_view.memory_markdown(service, values_of(args)), components, memory,
                          show_progress="hidden")
    launch.click(launcher(pair=False), [dataset, *components], launched)
    pair.click(launcher(pair=True), [dataset, *components], launched)
    save.click(on_save, [preset_name, *components], [preset_message, preset])
    load.click(on_load, [preset], [preset_message, *components])
    return {"tab": tab, "dataset": dataset, "form": form, "budget": budget, "defaults": defaults, "memory": memory,
            "memory_of": lambda *args: train_view.memory_markdown(service, values_of(args)), "components": components}


def runs_tab(service: StudioService) -> dict[str, Any]:
    with gr.Tab("Runs", id="runs") as tab:
        with gr.Row():
            status_filter = gr.Dropdown(["", *STATUSES], value="", label="Status", scale=1)
            adapter_filter = gr.Dropdown(["", *ADAPTERS], value="", label="Adapter", scale=1)
            tag_filter = gr.Textbox(label="Tag", max_length=runs_dashboard.MAX_SEARCH, scale=1)
            group_filter = gr.Textbox(label="Group", max_length=runs_dashboard.MAX_SEARCH, scale=1)
            search = gr.Textbox(label="Name contains", max_length=runs_dashboard.MAX_SEARCH, scale=2,
                                elem_id="runs-search")
            sort = gr.Dropdown(list(runs_dashboard.SORTS), value="newest", label="Sort", scale=1)
            page = gr.Number(value=1, precision=0, minimum=1, label="Page", scale=1, elem_id="runs-page")
        page_note = gr.Markdown(elem_id="runs-page-note")
        table = gr.Dataframe(headers=list(runs_view.RUN_COLUMNS), interactive=False, label="Queue and history",
                             elem_id="runs-table")
        selected = gr.CheckboxGroup([], label=f"Compare runs (curves update live; at most "
                                              f"{runs_dashboard.MAX_SELECTED})", elem_id="compare")
        with gr.Row():
            x_axis = gr.Radio(["step", "epoch", "tokens"], value="step", label="x-axis")
            smoothing = gr.Slider(0, 0.99, value=0.0, step=0.01, label="Smoothing")
            log_scale = gr.Checkbox(False, label="Log scale")
            zoom_from = gr.Number(value=None, precision=0, minimum=0, label="Zoom: from step", elem_id="zoom-from")
            zoom_to = gr.Number(value=None, precision=0, minimum=0, label="to step (0: the last)", elem_id="zoom-to")
        curves = gr.Plot(label="Loss", elem_id="loss-plot")
        with gr.Row():
            diff = gr.Dataframe(label="Config differences", interactive=False)
            metrics = gr.Dataframe(label="Adapters side by side", interactive=False)
        ranks = gr.Plot(label="Effective rank of the update, per layer")
        with gr.Row():
            chosen = gr.Dropdown([], label="Run", elem_id="run-action-target", scale=2)
            new_name = gr.Textbox(label="New name", scale=2)
        with gr.Row():
            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-run")
            resume = gr.Button("Resume")
            rename = gr.Button("Rename")
            delete = gr.Button("Delete")
            export = gr.Button("Export metrics CSV")
        action_message = gr.Markdown(elem_id="run-action-message")
        csv_file = gr.File(label="Metrics CSV", interactive=False)
        with gr.Row():
            export_format = gr.Dropdown(export_view.CHOICES, value="merged", label="Export the run's model as",
                                        elem_id="export-format", scale=3)
            export_model = gr.Button("Export", elem_id="export-run", scale=1)
        export_message = gr.Markdown(elem_id="export-message")
        export_file = gr.File(label="Exported model", interactive=False, elem_id="export-file")
        with gr.Accordion("Paper results (memorisation groups)", open=False,
                          elem_id="paper-results") as paper_results:
            with gr.Row():
                paper_group = gr.Dropdown([], label="Group", scale=4, elem_id="paper-group")
                paper_refresh = gr.Button("Show results", scale=1, elem_id="paper-show")
            paper_table = gr.Markdown(elem_id="paper-table")
            paper_figure = gr.Plot(label="Loss and character accuracy", elem_id="paper-figure")
        evaluation_panel(service, selected)
        dashboard = gr.State(None)
        timer = gr.Timer(1.0)

    def refresh(state, status, adapter, tag, group, text, order, page_number, run_ids, x, smooth, log, first,
                last):
        """One tick (`app.runs_dashboard`): only the parts that changed are sent."""
        try:
            query = runs_dashboard.RunsQuery(status or "", adapter or "", tag or "", group or "", text or "",
                                             order or "newest", max(1, int(page_number or 1)) - 1)
            view = runs_dashboard.CurveView(tuple(run_ids or ()), x, float(smooth), bool(log),
                                            runs_dashboard.zoom_range(first, last))
            result = runs_dashboard.tick(service, state, query, view)
        except FRIENDLY_ERRORS as error:
            return (state, gr.skip(), gr.skip(), gr.skip(), f"⚠️ {error}", *([gr.skip()] * 4))

        def sent(value):
            return gr.skip() if value is runs_dashboard.UNCHANGED else value

        choices = result.choices
        choice_updates = ((gr.skip(), gr.skip()) if choices is runs_dashboard.UNCHANGED
                          else (gr.CheckboxGroup(choices=choices), gr.Dropdown(choices=choices)))
        return (result.state, sent(result.table), *choice_updates, sent(result.page_note), sent(result.figure),
                sent(result.diff), sent(result.metrics), sent(result.ranks))

    def act(action, run_id, name):
        if not run_id:
            return "Choose a run first.", gr.skip()
        try:
            if action == "cancel":
                run = service.cancel(run_id)
                return f"{run.name}: {run.status}" + (" — stopping after its current step" if run.status ==
                                                      "running" else ""), gr.skip()
            if action == "resume":
                run = service.resume(run_id)
                return f"queued **{run.name}** (`{run.id}`), continuing from the last checkpoint", gr.skip()
            if action == "rename":
                run = service.rename(run_id, name)
                return f"renamed to **{run.name}**", gr.skip()
            if action == "delete":
                service.delete(run_id)
                return f"deleted run `{run_id}`", gr.skip()
            run = service.run(run_id)
            series = service.metric_series([run_id], None)
            path = runs_view.write_metrics_csv(run, series, settings.exports_dir())
            return f"exported {path.name}", str(path)
        except FRIENDLY_ERRORS as error:
            return f"⚠️ {error}", gr.skip()

    def memorize_groups():
        groups = sorted({r.group_name for r in service.runs() if r.group_name and "memorize" in r.tags}, reverse=True)
        return gr.Dropdown(choices=groups, value=groups[0] if groups else None)

    def paper_view(group):
        if not group:
            return "Launch the set from the Train tab first.", None
        try:
            return service.paper_results(group)
        except FRIENDLY_ERRORS as error:
            return f"⚠️ {error}", None

    paper_results.expand(memorize_groups, None, paper_group)
    paper_refresh.click(paper_view, paper_group, [paper_table, paper_figure])
    outputs = [dashboard, table, selected, chosen, page_note, curves, diff, metrics, ranks]
    inputs = [dashboard, status_filter, adapter_filter, tag_filter, group_filter, search, sort, page, selected, x_axis,
              smoothing, log_scale, zoom_from, zoom_to]
    timer.tick(refresh, inputs, outputs, show_progress="hidden")
    tab.select(refresh, inputs, outputs, show_progress="hidden")
    for control in (selected, x_axis, smoothing, log_scale, status_filter, adapter_filter, sort, page):
        control.change(refresh, inputs, outputs, show_progress="hidden")
    for box in (tag_filter, group_filter, search, zoom_from, zoom_to):
        box.submit(refresh, inputs, outputs, show_progress="hidden")
    for button, action in ((cancel, "cancel"), (resume, "resume"), (rename, "rename"), (delete, "delete"),
                           (export, "export")):
        button.click(lambda run_id, name, action=action: act(action, run_id, name), [chosen, new_name],
                     [action_message, csv_file])
    export_model.click(lambda run_id, choice: (yield from export_view.export_run(service, run_id, choice)),
                       [chosen, export_format], [export_message, export_file])
    return {"tab": tab, "refresh": refresh}


def evaluation_panel(service: StudioService, selected: gr.CheckboxGroup) -> None:
    """The Runs tab's Evaluation view (`app.eval_view`): launch on the ticked runs, read scores and answers."""
    with gr.Accordion("Evaluation: which adapter learned the data", open=False, elem_id="evaluation"):
        with gr.Row():
            include_base = gr.Checkbox(True, label="Base model too", elem_id="eval-base")
            prompts = gr.Radio(list(eval_view.PROMPT_SOURCES), value="eval split", label="Prompts",
                               elem_id="eval-prompts")
            dataset = gr.Dropdown(_dataset_choices(service), label="Dataset (for prompts from a file)",
                                  elem_id="eval-dataset")
            limit = gr.Number(value=50, precision=0, minimum=1, maximum=eval_view.MOST_PROMPTS,
                              label="Prompts (at most)", elem_id="eval-limit")
            max_new_tokens = gr.Number(value=64, precision=0, minimum=1, maximum=1024, label="Max new tokens",
                                       elem_id="eval-max-tokens")
        with gr.Accordion("LLM judge (optional, any OpenAI-compatible endpoint)", open=False):
            with gr.Row():
                judge_mode = gr.Dropdown(["off", "pointwise", "pairwise", "both"], value="off", label="Judge")
                judge_url = gr.Textbox(label="Endpoint URL (…/v1)", max_length=2000)
                judge_model = gr.Textbox(label="Model", max_length=200)
                judge_key = gr.Textbox(label="API key", type="password", max_length=500)
        with gr.Row():
            launch = gr.Button("Evaluate the ticked runs", variant="primary", elem_id="eval-launch")
            cancel = gr.Button("Stop the evaluation", elem_id="eval-cancel")
        message = gr.Markdown(elem_id="eval-message")
        with gr.Row():
            chosen = gr.Dropdown([], label="Evaluation", elem_id="eval-choice", scale=3)
            sort = gr.Dropdown(list(eval_view.SORTS), value=eval_view.SORTS[0], label="Order the prompts by",
                               elem_id="eval-sort", scale=1)
            metric = gr.Dropdown(list(eval_view.TABLE_METRICS), value="token_f1", label="Metric",
                                 elem_id="eval-metric", scale=1)
        status = gr.Markdown(elem_id="eval-status")
        scores = gr.Dataframe(interactive=False, label="Scores (one row per run; the base model is a row)",
                              elem_id="eval-scores")
        curves = gr.Plot(label="The metric over steps", elem_id="eval-curves")
        examples = gr.HTML(elem_id="eval-examples")
        version = gr.State(None)
        timer = gr.Timer(2.0)

    def on_launch(run_ids, base, source, dataset_id, count, tokens, mode, url, model, key):
        try:
            record = eval_view.launch(service, run_ids, base, source, dataset_id, count, tokens, mode, url, model, key)
        except FRIENDLY_ERRORS as error:
            return f"⚠️ {error}", gr.skip()
        choices = eval_view.evaluation_choices(service.evaluations())
        return f"✅ queued the evaluation **{record.name}** (`{record.id}`)", gr.Dropdown(choices=choices,
                                                                                        value=record.id)

    def on_cancel(eval_id):
        if not eval_id:
            return "Choose an evaluation first."
        try:
            service.cancel_evaluation(eval_id)
        except FRIENDLY_ERRORS as error:
            return f"⚠️ {error}"
        return "stopping after the current batch; what was answered is kept"

    def on_tick(last, eval_id, order, name, run_ids):
        try:
            result = eval_view.refresh(service, last, eval_view.ViewChoice(eval_id or None, order, name,
                                                                          tuple(run_ids or ())))
        except FRIENDLY_ERRORS as error:
            return last, f"⚠️ {error}", gr.skip(), gr.skip(), gr.skip()

        def sent(value):
            return gr.skip() if value is eval_view.UNCHANGED else value

        return result.version, sent(result.status), sent(result.scores), sent(result.examples), sent(result.curves)

    launch.click(on_launch, [selected, include_base, prompts, dataset, limit, max_new_tokens, judge_mode, judge_url,
                             judge_model, judge_key], [message, chosen])
    cancel.click(on_cancel, [chosen], [message])
    view_inputs = [version, chosen, sort, metric, selected]
    view_outputs = [version, status, scores, examples, curves]
    timer.tick(on_tick, view_inputs, view_outputs, show_progress="hidden")
    for control in (chosen, sort, metric):
        control.change(on_tick, view_inputs, view_outputs, show_progress="hidden")
    dataset.focus(lambda: gr.Dropdown(choices=_dataset_choices(service)), None, dataset)
    chosen.focus(lambda: gr.Dropdown(choices=eval_view.evaluation_choices(service.evaluations())), None, chosen)


def chat_tab(service: StudioService) -> dict[str, Any]:
    with gr.Tab("Chat", id="chat") as tab:
        with gr.Row():
            base = gr.Dropdown(_model_choices(), value=_default_model(), label="Base model", scale=2)
            adapters = gr.CheckboxGroup(chat_view.adapter_choices(service, _default_model()),
                                        label="Answer with (up to four)", elem_id="chat-adapters", scale=5)
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
            max_tokens = gr.Slider(8, 1024, value=128, step=8, label="Max new tokens")
            blind = gr.Checkbox(False, label="Blind A/B (two adapters, names hidden until you vote)",
                                elem_id="blind")
        with gr.Row():
            bots = [gr.Chatbot(label=f"answer {i + 1}", visible=i < 2, height=360, elem_id=f"bot-{i}")
                    for i in range(chat_view.MAX_ROWS)]
        prompt = gr.Textbox(label="Message", placeholder="Ask something and press Enter", elem_id="chat-input")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="chat-send")
            stop = gr.Button("Stop", variant="stop", elem_id="chat-stop")
            new = gr.Button("New conversation")
        with gr.Row():
            vote_a = gr.Button("A is better", elem_id="vote-a")
            vote_b = gr.Button("B is better", elem_id="vote-b")
        vote_message = gr.Markdown(elem_id="vote-message")
        state = gr.State(None)

    def on_base(model):
        return gr.CheckboxGroup(choices=chat_view.adapter_choices(service, model), value=[])

    def on_send(model, chosen, temp, tokens, blind_mode, text, session):
        yield from chat_view.send(service, model, chosen, temp, tokens, blind_mode, text, session)

    def on_vote(winner, session):
        return chat_view.vote(service, session, winner)

    tab.select(on_base, [base], [adapters])
    base.change(on_base, [base], [adapters])
    chat_inputs = [base, adapters, temperature, max_tokens, blind, prompt, state]
    chat_outputs = [state, prompt, *bots, vote_message]
    send.click(on_send, chat_inputs, chat_outputs)
    prompt.submit(on_send, chat_inputs, chat_outputs)
    stop.click(chat_view.stop, [state], [vote_message])  # the send stream then shows the end and stores it
    new.click(lambda: (None, *([[]] * chat_view.MAX_ROWS), ""), None, [state, *bots, vote_message])
    vote_a.click(lambda s: on_vote("A", s), [state], [vote_message, *bots])
    vote_b.click(lambda s: on_vote("B", s), [state], [vote_message, *bots])
    return {"tab": tab}


def system_tab(service: StudioService) -> dict[str, Any]:
    with gr.Tab("System", id="system") as tab:
        workers_table = gr.Dataframe(headers=list(system_view.WORKER_COLUMNS), interactive=False, label="Workers")
        queues = gr.Markdown()
        usage = gr.Dataframe(headers=list(system_view.USAGE_COLUMNS), interactive=False, label="Data folder")
        timer = gr.Timer(2.0)

    def refresh():
        return system_view.workers_rows(), system_view.queues_markdown(), system_view.usage_rows(settings.data_dir())

    timer.tick(refresh, None, [workers_table, queues, usage], show_progress="hidden")
    tab.select(refresh, None, [workers_table, queues, usage])
    return {"tab": tab}


def build_app(service: StudioService) -> gr.Blocks:
    with gr.Blocks(title="MoRA Studio") as app:
        gr.Markdown("## MoRA Studio — fine-tune with MoRA or LoRA, compare what each adapter learned")
        with gr.Tabs():
            data = data_tab(service)
            train = train_tab(service)
            runs_tab(service)
            chat_tab(service)
            system_tab(service)

        refresh_datasets = lambda: gr.Dropdown(choices=_dataset_choices(service))  # noqa: E731
        train["tab"].select(refresh_datasets, None, train["dataset"])
        data["tab"].select(lambda: service.datasets_table(), None, data["table"])
        form = train["form"]
        app.load(lambda m, r, v, a: (train_view.defaults_note(a, r, v), train_view.budget_markdown(m, r, v, a)),
                 [form["model"], form["r"], form["variant"], form["adapter"]], [train["defaults"], train["budget"]])
        for event in (app.load, train["tab"].select):  # workers come and go: estimate against those there now
            event(train["memory_of"], train["components"], train["memory"], show_progress="hidden")
            event(lambda: _device_choices(service), None, [form["devices"], form["quantization"]],
                  show_progress="hidden")
    return app
