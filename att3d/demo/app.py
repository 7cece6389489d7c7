"""The page of ``att3d demo`` (gradio): text to a 3D object, interpolation between prompts, the model card.

:func:`build_demo` lays out a ``gr.Blocks`` over a :class:`~att3d.demo.core.DemoBackend`;
:func:`launch_demo` serves it (127.0.0.1 only unless told otherwise, no public share link unless
asked, a bounded queue, one model job at a time, gradio's own files inside the app's output folder,
no uploads beyond 1 MB).

Every handler turns bad input into a message in the page (the ``status`` boxes) and an unexpected
failure into a one-line message, with the traceback only in the server's log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from att3d.demo.core import (
    DEFAULT_MODEL_PATHS,
    DEFAULT_OUT_DIR,
    DETAILS,
    KEEP_RUNS,
    MAX_PROMPT_CHARS,
    DemoBackend,
    DemoInputError,
    DemoSettings,
    ProgressFn,
    example_prompts,
    find_models,
)
from att3d.utils.errors import one_line

log = logging.getLogger(__name__)

TITLE = "att3d demo: amortized text-to-3D"
#: Requests waiting in the queue at most (more are refused with a message); model jobs run one at a time.
QUEUE_SIZE = 16
CONCURRENCY_ID = "att3d-model"
#: The end of the status line once a generation's downloads are written.
DOWNLOADS_READY = "Downloads: GLB, OBJ (zip), PLY."
INTERPOLATION_EXAMPLES = [["a red cube", "a blue sphere"], ["a green cone", "a yellow cylinder"],
                          ["a purple torus", "a orange pyramid"], ["a pink capsule", "a gray octahedron"]]
CSS = """
.att3d-status { min-height: 2.5em; }
.att3d-status p { margin: 0.2em 0; }
footer { display: none !important; }
"""


def _error(message: str) -> str:
    return f"⚠️ {message}"


def _guard(fn: Callable[[], Any], what: str) -> tuple[Any, str | None]:
    """``(fn(), None)``, or ``(None, message)`` for bad input or a failure (logged with its traceback)."""
    try:
        return fn(), None
    except DemoInputError as e:
        return None, _error(one_line(e))
    except Exception as e:  # never a traceback in the page
        log.exception("%s failed", what)
        return None, _error(f"{what} failed: {type(e).__name__}: {one_line(e)[:300]}")


def _progress(progress: Any) -> ProgressFn:
    def fn(fraction: float, desc: str) -> None:
        try:
            progress(fraction, desc=desc)
        except Exception:  # no progress tracker outside a request
            pass

    return fn


def gradio_environment(out_dir: str | os.PathLike) -> None:
    """Put gradio's own folders (its file cache, uploads, cached examples) inside the app's output folder and
    switch off its analytics. Runs before gradio builds the page (it reads these when the page is built)."""
    root = Path(out_dir).expanduser().resolve()
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio-cache")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(root / "gradio-examples")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def build_demo(model_dirs: Iterable[str | os.PathLike] | dict[str, Path] | None = None,
               out_dir: str | os.PathLike = DEFAULT_OUT_DIR, settings: DemoSettings | None = None,
               device: str = "cpu", preload: bool = True, keep: int = KEEP_RUNS) -> Any:
    """The demo page.

    Args:
        model_dirs: model folders or folders to search for them (:func:`~att3d.demo.core.find_models`;
            default ``assets/`` and ``runs/``), or a ready ``{label: folder}``. The first is the default model.
        out_dir: the app's output folder; it writes nowhere else.
        settings: sizes of meshes and videos.
        device: where models run.
        preload: load the default model now (the first request is then as fast as the others).
        keep: request folders kept in ``out_dir``.

    Returns:
        a ``gr.Blocks``; serve it with :func:`launch_demo`. ``demo.att3d_backend`` is its
        :class:`~att3d.demo.core.DemoBackend`.
    """
    models = dict(model_dirs) if isinstance(model_dirs, dict) else \
        find_models(DEFAULT_MODEL_PATHS if model_dirs is None else model_dirs)
    backend = DemoBackend(models, out_dir, settings=settings, device=device, keep=keep)
    gradio_environment(backend.store.root)
    start = backend.preload() if preload else None
    start_glb = str(start.glb) if start is not None and start.glb is not None else None
    start_text = start.message if start_glb else "Type a prompt, or pick an example below."

    import gradio as gr

    examples = example_prompts()
    card_text, card_figs = backend.card(backend.default_model)
    s = backend.settings
    steps = s.slider_steps

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# att3d: amortized text-to-3D\n"
                    "One forward pass per prompt: text encoder -> hypernetwork -> neural field -> textured mesh. "
                    "No per-prompt optimisation.")
        model = gr.Dropdown(backend.labels, value=backend.default_model, label="Model", elem_id="model",
                            interactive=True)
        run = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Text to 3D", id="generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt = gr.Textbox(label=f"Prompt (at most {MAX_PROMPT_CHARS} characters)",
                                            placeholder="a red cube", lines=1, elem_id="prompt")
                        generate = gr.Button("Generate", variant="primary", elem_id="generate")
                        detail = gr.Radio(list(DETAILS), value="fast", elem_id="detail", container=False,
                                          label=f"Mesh detail (fast: {s.grid_resolution}^3 grid; "
                                                f"fine: {s.fine_grid_resolution}^3, slower)", show_label=False)
                        status = gr.Markdown(start_text, elem_id="status",
                                             elem_classes=["att3d-status"])
                        gr.Examples([[p] for p in examples["seen"]], inputs=[prompt], label="Seen in training",
                                    examples_per_page=8)
                        gr.Examples([[p] for p in examples["held_out"]], inputs=[prompt],
                                    label="Held out (never seen in training)", examples_per_page=8)
                    with gr.Column(scale=3):
                        viewer = gr.Model3D(start_glb, label="3D object: drag to rotate, scroll to zoom",
                                            elem_id="viewer", clear_color=(1.0, 1.0, 1.0, 1.0), height=420,
                                            interactive=False)
                        with gr.Row():
                            dl_glb = gr.DownloadButton("GLB", interactive=False, elem_id="dl-glb", size="sm")
                            dl_obj = gr.DownloadButton("OBJ (zip)", interactive=False, elem_id="dl-obj", size="sm")
                            dl_ply = gr.DownloadButton("PLY", interactive=False, elem_id="dl-ply", size="sm")
                        with gr.Accordion("Turntable video", open=False):
                            turn_btn = gr.Button("Render a turntable", interactive=False, elem_id="turntable",
                                                 size="sm")
                            turn_video = gr.Video(label="Turntable", elem_id="turntable-video", autoplay=True,
                                                  loop=True, interactive=False)
            with gr.Tab("Interpolate", id="interpolate"):
                with gr.Row():
                    prompt_a = gr.Textbox(label="From", value="a red cube", elem_id="prompt-a")
                    prompt_b = gr.Textbox(label="To", value="a blue sphere", elem_id="prompt-b")
                    mode = gr.Radio(["linear", "slerp"], value=backend.settings.mode, label="Embedding path",
                                    elem_id="mode")
                with gr.Row():
                    with gr.Column(scale=3):
                        slider = gr.Slider(0.0, 1.0, value=0.0, step=1.0 / (steps - 1), elem_id="interp-t",
                                           label="Position along the interpolation (0: From, 1: To)")
                        with gr.Row():
                            show = gr.Button("Show", variant="primary", elem_id="interp-show")
                            animate = gr.Button("Make an animation", elem_id="interp-animate")
                        interp_status = gr.Markdown("Pick two prompts and move the slider.", elem_id="interp-status",
                                                    elem_classes=["att3d-status"])
                        interp_viewer = gr.Model3D(label="Object at this position", elem_id="interp-viewer",
                                                   clear_color=(1.0, 1.0, 1.0, 1.0), height=380, interactive=False)
                    with gr.Column(scale=2):
                        interp_video = gr.Video(label="Animation along the interpolation (orbiting camera)",
                                                elem_id="interp-video", autoplay=True, loop=True, interactive=False,
                                                height=360)
                        gr.Examples(INTERPOLATION_EXAMPLES, inputs=[prompt_a, prompt_b], label="Pairs")
            with gr.Tab("Model card", id="card"):
                card_gallery = gr.Gallery(card_figs, label="Figures of the model card", columns=2, height=440,
                                          object_fit="contain", elem_id="card-figures", interactive=False)
                card_md = gr.Markdown(card_text, elem_id="card")

        # Model jobs: one at a time (one queue for all of them); not callable through gradio's API, only the page.
        # always_last: a click while the same job still runs is served after it (the last input wins); gradio's
        # default for clicks ("once") would drop it without a word.
        heavy: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": CONCURRENCY_ID, "api_visibility": "private",
                                 "trigger_mode": "always_last"}

        def on_generate(text: Any, label: Any, how: Any, progress=gr.Progress()):
            off = gr.update(interactive=False, value=None)
            result, err = _guard(lambda: backend.generate(text, label, _progress(progress), how), "generation")
            if err is not None:
                yield gr.update(), gr.update(), gr.update(), gr.update(), err, gr.update(), gr.update()
                return
            if result.glb is None:
                yield None, off, off, off, _error(result.message), None, gr.update(interactive=False)
                return
            glb = str(result.glb)
            yield (glb, gr.update(value=glb, interactive=True), off, off, result.message + " Writing OBJ and PLY...",
                   result.run, gr.update(interactive=True))
            files, err = _guard(lambda: backend.downloads(result.run), "export")
            if err is not None:
                yield gr.update(), gr.update(), gr.update(), gr.update(), result.message + " " + err, gr.update(), \
                    gr.update()
                return
            yield (gr.update(), gr.update(), gr.update(value=str(files["obj"]), interactive=True),
                   gr.update(value=str(files["ply"]), interactive=True), result.message + " " + DOWNLOADS_READY,
                   gr.update(), gr.update())

        gen_outputs = [viewer, dl_glb, dl_obj, dl_ply, status, run, turn_btn]
        for trigger in (generate.click, prompt.submit):
            trigger(on_generate, [prompt, model, detail], gen_outputs, show_progress_on=[viewer], **heavy)

        def on_turntable(run_name: Any, progress=gr.Progress()):
            video, err = _guard(lambda: backend.turntable(run_name, _progress(progress)), "turntable")
            return (gr.update(), err) if err else (str(video), gr.update())

        turn_btn.click(on_turntable, [run], [turn_video, status], **heavy)

        def on_frame(a: Any, b: Any, t: Any, how: Any, label: Any, progress=gr.Progress()):
            result, err = _guard(lambda: backend.interpolation_frame(a, b, t, how, label, _progress(progress)),
                                 "interpolation")
            if err is not None:
                return gr.update(), err
            if result.glb is None:
                return None, _error(result.message)
            return str(result.glb), result.message

        frame_io = ([prompt_a, prompt_b, slider, mode, model], [interp_viewer, interp_status])
        show.click(on_frame, *frame_io, **heavy)
        slider.change(on_frame, *frame_io, show_progress="minimal", **heavy)

        def on_animate(a: Any, b: Any, how: Any, label: Any, progress=gr.Progress(track_tqdm=True)):
            out, err = _guard(lambda: backend.interpolation_video(a, b, how, label, _progress(progress)), "animation")
            if err is not None:
                return gr.update(), err
            video, seconds = out
            return str(video), f"Animation of {backend.settings.video_frames} frames rendered in {seconds:.1f} s."

        animate.click(on_animate, [prompt_a, prompt_b, mode, model], [interp_video, interp_status], **heavy)

        def on_model(label: Any):
            out, err = _guard(lambda: backend.card(label), "model card")
            if err is not None:
                return err, gr.update()
            return out

        model.change(on_model, [model], [card_md, card_gallery], api_visibility="private", concurrency_limit=4)

    demo.att3d_backend = backend  # type: ignore[attr-defined]
    return demo


def _theme() -> Any:
    import gradio as gr

    # System fonts only: the default theme's web fonts would be fetched from the internet.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "DejaVu Sans", "sans-serif"],
                             font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"])


def launch_demo(demo: Any, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
                queue_size: int = QUEUE_SIZE, prevent_thread_lock: bool = False, quiet: bool = False) -> Any:
    """Serve a page from :func:`build_demo` on ``host:port`` (blocks unless ``prevent_thread_lock``).

    The queue holds at most ``queue_size`` requests; model jobs run one at a time. Only the app's output
    folder is served (and gradio's cache inside it); uploads are limited to 1 MB. ``share`` opens a
    public gradio.live link: off unless asked.

    Returns:
        what ``gr.Blocks.launch`` returns (app, local URL, share URL).
    """
    backend: DemoBackend = demo.att3d_backend
    demo.queue(max_size=max(1, int(queue_size)), default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=int(port), share=bool(share), inbrowser=False,
                       show_error=False, allowed_paths=[str(backend.store.root)], max_file_size="1mb",
                       ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False,
                       prevent_thread_lock=prevent_thread_lock, quiet=quiet, theme=_theme(), css=CSS)
