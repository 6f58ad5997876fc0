"""Build the explorer's ``gr.Blocks`` without launching it (tests import it and drive it via a server)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import gradio as gr

from age_explorer.core.bundle import PromptWarning
from age_explorer.core.erasure.config import MAX_ITERATIONS, PRESETS, short
from age_explorer.core.graph.capability import CapabilitySpec, default_evaluator_name, load_evaluator
from age_explorer.core.graph.store import GraphStore
from age_explorer.core.graph.sweep import base_nodes, measure_row
from age_explorer.core.imageio import contact_sheet, to_pil
from age_explorer.core.runs import read_manifest
from age_explorer.core.sampling import generate, parse_seeds

from . import plots, tools
from .components import concept_graph
from .service import Explorer, Settings, before_after_rows, prompt_for
from .space import gpu

__all__ = ["build_app", "Settings"]

MAX_SEEDS = 8
PRESET_VOCAB = "(preset)"
EMPTY_FIG = "{}"
# Model work from the page (generation, spillover, similarity) runs one request at a time, beside the
# background job: on a CPU, parallel requests would split the cores until none makes progress.
COMPUTE_SLOT = {"concurrency_limit": 1, "concurrency_id": "compute"}


def whole_number(**kwargs) -> gr.Number:
    """A ``gr.Number`` whose non-numeric API input ("abc") is a readable error naming the field, not
    Gradio's generic "upstream app has raised an exception". (Wrapped on the instance: a subclass
    would make Gradio write a .pyi file next to this module.)"""
    box = gr.Number(**kwargs)
    parse = box.preprocess

    def preprocess(payload):
        try:
            return parse(payload)
        except (TypeError, ValueError, OverflowError):
            raise gr.Error(f"{box.label}: {short(payload)} is not a whole number") from None

    box.preprocess = preprocess
    return box


def _owner(owner: str, request) -> str | None:
    """Who a request acts for: the secret its browser keeps (set on page load), else, for API clients,
    their Gradio session. Matters only in public mode."""
    return owner or (request.session_hash if request is not None else None)


def _progress_html(job) -> str:
    if job is None:
        return "<div id='job_progress'></div>"
    share = job.step / job.total if job.total else 0.0
    eta = job.progress.get("eta")
    eta_text = f", about {eta:.0f} s left" if eta and job.status == "running" else ""
    return (f"<div id='job_progress' data-status='{job.status}' style='border:1px solid #ccc;border-radius:4px;height:22px'>"
            f"<div style='width:{share * 100:.1f}%;height:100%;background:#3d6fd9'></div></div>"
            f"<div id='job_text'>{job.status}: step {job.step}/{job.total}{eta_text}</div>")


def build_app(settings: Settings | None = None) -> gr.Blocks:
    settings = settings or Settings()
    ex = Explorer(settings)
    # With MCP on, only the read-only graph queries are public, so only they become MCP tools; the
    # page's own endpoints stay callable by clients ("undocumented").
    ui_api = "undocumented" if settings.mcp else "public"
    graphs = ex.graph_dirs()
    graph_names = list(graphs)
    first = GraphStore(graphs[graph_names[0]]) if graph_names else None
    concepts = list(first.nodes().concept) if first else (ex.bundle().backend.world.names if ex.is_toy else [])
    groupings = [c[len("group_"):] for c in first.nodes().columns if c.startswith("group_")] if first else []

    def graph_outputs(name, threshold, grouping, selected):
        if not name:
            return EMPTY_FIG, None, "No graph yet: compute one with `age-explorer graph`.", None
        store = GraphStore(graphs[name])
        nodes, edges = store.nodes(), store.edges()
        col = f"group_{grouping}" if grouping else None
        fig = plots.network_figure(nodes, edges, threshold, col, selected)
        heat = plots.heatmap_figure(store.matrix(), nodes, col, f"Δ (rows = erased): {name}")
        details, bar = _details(store, selected)
        return fig.to_json(), heat, details, bar

    def _details(store, selected):
        meta = store.meta()
        text = (f"**{meta['method'].upper()}** (preset {meta.get('preset')}, target {meta.get('target')!r}), "
                f"{len(store.rows_done())} rows, {meta['images_per_concept']} images per concept, "
                f"classifier {meta['evaluator']}.")
        if not selected:
            return text + " Click a node or pick a concept.", None
        nodes = store.nodes().set_index("concept")
        if selected not in nodes.index:
            return text + f"\n\n{selected!r} is not in this graph.", None
        text += f"\n\n**{selected}**: G₀ = {nodes.loc[selected, 'G0_top1']:.2f}."
        edges = store.edges()
        row = edges[edges.erased == selected]
        if len(row):
            worst = row[row.affected != selected].nlargest(3, "delta_top1")
            text += " Erasing it hurts most: " + ", ".join(f"{r.affected} (Δ {r.delta_top1:.2f})" for r in worst.itertuples())
            return text, plots.spillover_bar_figure(row, selected)
        return text + " (no row for it in this graph)", None

    def on_node_click(evt: gr.SelectData):
        return evt.value

    def difference(name_a, name_b, grouping):
        if not name_a or not name_b or name_b == "(none)":
            return None
        a, b = GraphStore(graphs[name_a]), GraphStore(graphs[name_b])
        col = f"group_{grouping}" if grouping else None
        return plots.difference_figure(a.matrix(), b.matrix(), a.nodes(), col, f"Δ {name_a} − Δ {name_b}")

    def umap_view(name, selected, progress=gr.Progress()):
        if not name:
            return None
        progress(0.1, desc="embedding prompts")
        store = GraphStore(graphs[name])
        nodes = store.nodes()
        coords = _umap_coords(tuple(nodes.concept))
        edges = store.edges()
        row = edges[edges.erased == selected].set_index("affected").delta_top1 if selected else None
        return plots.umap_figure(coords, nodes, row, "UMAP of prompt embeddings" + (f", coloured by Δ of erasing {selected}" if selected else ""))

    _umap_cache: dict = {}

    def _umap_coords(names: tuple[str, ...]):
        if names not in _umap_cache:
            import umap

            bundle = ex.bundle()
            states = bundle.encode([prompt_for(ex, c) for c in names]).float().flatten(1).cpu().numpy()
            _umap_cache[names] = umap.UMAP(n_neighbors=min(8, len(names) - 1), random_state=0).fit_transform(states)
        return _umap_cache[names]

    _similarity_cache: dict = {}

    def scatter_view(name, measure, progress=gr.Progress()):
        if not name:
            return None
        from age_explorer.core.graph.analysis import similarity_measures
        from age_explorer.core.graph.concept_sets import ConceptSet

        store = GraphStore(graphs[name])
        meta = store.meta()
        if name not in _similarity_cache:
            progress(0.2, desc="similarity measures")
            with ex.compute():
                _similarity_cache[name] = similarity_measures(ex.bundle(), ConceptSet.from_dict(meta["concept_set"]))
        pairs = store.edges().rename(columns={"erased": "a", "affected": "b"}).merge(_similarity_cache[name], on=["a", "b"])
        return plots.scatter_figure(pairs, measure)

    # ---- erase ---------------------------------------------------------------------------------
    def start_erase(chosen, free_text, method, preset, iterations, lam, search, target, vocab=PRESET_VOCAB,
                    own_candidates="", owner="", request: gr.Request = None):
        names = list(chosen or []) + [c.strip() for c in (free_text or "").split(",") if c.strip()]
        if not names:
            raise gr.Error("pick at least one concept to erase")
        if ex.is_toy:
            unknown = [c for c in names if c not in ex.bundle().backend.world.names]
            if unknown:
                raise gr.Error(f"the toy model knows only its 25 concepts; unknown: {', '.join(short(c) for c in unknown[:5])}")
            unknown = ex.bundle().unknown_words(target or "") if method != "age" else []
            if unknown:
                raise gr.Error(f"the toy model does not know the target's words {', '.join(unknown[:10])}; "
                               f"its words: {', '.join(ex.bundle().vocabulary())}")
        options = {}
        if iterations:
            if iterations != iterations or abs(iterations) == float("inf"):
                raise gr.Error(f"model steps must be a whole number from 1 to {MAX_ITERATIONS:,}")
            options["iterations"] = int(iterations)
        if method == "age":
            if lam is not None:
                options["lam"] = float(lam)
            options["target_search"] = search
            candidates = [c.strip() for c in (own_candidates or "").split(",") if c.strip()]
            if candidates:
                unknown = sorted({w for c in candidates for w in ex.bundle().unknown_words(c)}) if ex.is_toy else []
                if unknown:
                    raise gr.Error(f"the toy model does not know {', '.join(unknown[:10])}; "
                                   f"its words: {', '.join(ex.bundle().vocabulary())}")
                options["candidates"] = candidates
            elif vocab and vocab != PRESET_VOCAB:
                if ex.is_toy and vocab != "toy":
                    raise gr.Error(f"the toy model knows only its own words: use the 'toy' vocabulary, not {vocab!r}")
                options["vocab"] = vocab
        elif target is not None:
            options["target"] = target
        if method != "uce":  # UCE is one closed-form edit: nothing to checkpoint
            options["checkpoint_every"] = 25
        preset = preset if preset and PRESETS.get(preset, ("",))[0] == method else None
        try:
            from age_explorer.core.erasure import make_config

            config = make_config(method, preset, concepts=names, **options)  # validate now, with a readable message
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if config.requires_gpu and not ex.device.startswith("cuda"):
            raise gr.Error(f"preset {preset!r} is sized for a GPU and this server runs on the CPU; "
                           f"pick a toy preset")
        job_id = ex.submit_erase(names, method, preset, options, owner=_owner(owner, request))
        return job_id, job_id, gr.Timer(active=True), [], _queue_text(job_id)

    def _queue_text(job_id):
        ahead = ex.store.queue_position(job_id) if job_id else 0
        running = [j for j in ex.store.list(status="running")]
        shown = f"{len(running)} job(s)" if settings.public else ", ".join(j.id for j in running)  # ids are keys
        return (f"Job `{job_id}` queued" + (f", {ahead} job(s) ahead" if ahead else "") +
                (f"; running now: {shown}" if running else ""))

    def tick(job_id, history, owner="", request: gr.Request = None):
        if not job_id:
            return gr.Timer(active=False), _progress_html(None), gr.skip(), gr.skip(), gr.skip(), gr.skip(), history
        try:
            job = ex.poll(job_id, _owner(owner, request))  # also restarts a dead worker, marks its job interrupted
        except KeyError:
            return gr.Timer(active=False), _progress_html(None), "unknown job", gr.skip(), gr.skip(), gr.skip(), history
        progress = job.progress
        if progress.get("losses") and (not history or history[-1]["step"] != job.step):
            history = history + [{"step": job.step, **progress["losses"]}]
        status = f"**{job.status}**" + (f": {job.error.splitlines()[0]}" if job.error else "")
        if job.status in ("interrupted", "failed"):
            status += "  \nPress **Resume** to continue from the last checkpoint."
        if progress.get("targets"):
            status += "  \nTop targets: " + "; ".join(f"{c}: " + ", ".join(f"{w} {p:.2f}" for w, p in t[:3])
                                                     for c, t in progress["targets"].items())
        if progress.get("pick") is not None and progress.get("pick_is_neighbour") is not None:
            status += f"  \nLast target used: {progress['pick']} ({'a neighbour' if progress['pick_is_neighbour'] else 'not a neighbour'})"
        preview = progress.get("preview")
        active = job.status in ("queued", "running")
        return (gr.Timer(active=active), _progress_html(job), status, plots.loss_figure(history),
                plots.targets_figure(progress["targets"]) if progress.get("targets") else gr.skip(),
                preview if preview else gr.skip(), history)

    def job_status_json(job_id, owner="", request: gr.Request = None):
        try:
            job = ex.job(job_id, _owner(owner, request))
        except KeyError as err:
            raise gr.Error(str(err)) from None
        return json.dumps({k: v for k, v in job.__dict__.items() if k not in ("lease", "session")}, default=str)

    def cancel(job_id, owner="", request: gr.Request = None):
        if not job_id:
            raise gr.Error("no job to cancel")
        try:
            return f"Job `{job_id}`: {ex.cancel(job_id, _owner(owner, request))}"
        except KeyError as err:
            raise gr.Error(str(err)) from None

    def resume(job_id, owner="", request: gr.Request = None):
        if not job_id:
            raise gr.Error("no job to resume")
        try:
            ex.resume(job_id, _owner(owner, request))
        except (KeyError, ValueError) as err:
            raise gr.Error(str(err)) from None
        return f"Job `{job_id}` queued again; it continues from its last checkpoint", gr.Timer(active=True)

    def reattach(saved_job, owner_token):
        import secrets

        owner_token = owner_token or secrets.token_hex(16)  # this browser's secret: its jobs and runs
        if saved_job:
            try:
                job = ex.job(saved_job, owner_token)
            except KeyError:
                return "", gr.Timer(active=False), owner_token, owner_token
            return saved_job, gr.Timer(active=job.status in ("queued", "running")), owner_token, owner_token
        return "", gr.Timer(active=False), owner_token, owner_token

    # ---- before / after --------------------------------------------------------------------------
    def _run_dir(run_label, owner, request):
        runs = ex.finished_runs(_owner(owner, request))
        if run_label not in runs:
            raise gr.Error(f"no finished run {short(run_label)}: press Refresh runs")
        return runs[run_label]

    def refresh_runs(owner="", request: gr.Request = None):
        runs = list(ex.finished_runs(_owner(owner, request)))
        return gr.Dropdown(choices=runs, value=runs[0] if runs else None), gr.Dropdown(choices=runs, value=runs[0] if runs else None)

    @gpu
    def show_before_after(run_label, seeds_text, owner="", request: gr.Request = None, progress=gr.Progress()):
        if not run_label:
            raise gr.Error("no finished run yet: erase a concept first")
        try:
            seeds = parse_seeds(seeds_text, limit=MAX_SEEDS)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        run_dir = _run_dir(run_label, owner, request)
        manifest = read_manifest(Path(run_dir))
        rows = before_after_rows(ex, manifest)
        base, erased = ex.bundle(), ex.erased_bundle(run_dir)
        esd_dir = ex.esd_counterpart(run_dir, manifest, _owner(owner, request))
        models = [("original", base), ("erased", erased)]
        if esd_dir:
            models.append(("ESD " + repr(read_manifest(Path(esd_dir))["config"].get("target", "")), ex.erased_bundle(esd_dir)))
        prompts = [prompt_for(ex, c) for _, c in rows]
        images = []
        with warnings.catch_warnings(), ex.compute():
            warnings.simplefilter("ignore", PromptWarning)
            for i, (name, bundle) in enumerate(models):
                progress(i / len(models), desc=f"{name} model")
                images.append(generate(bundle, prompts, seeds))
        n = len(seeds)
        strips = [[batch[i * n:(i + 1) * n] for batch in images] for i in range(len(rows))]
        row_labels = [f"{label}: {concept}" for label, concept in rows]
        column_labels = [name for name, _ in models]
        sheet = contact_sheet(strips, row_labels, column_labels, image_px=64 if base.kind == "toy" else 128)
        pair = (to_pil(images[0][0], 256), to_pil(images[1][0], 256))
        legend = (f"Seeds {seeds_text.strip()}, left to right in each strip. Columns: {', '.join(column_labels)}. "
                  f"Rows: {'; '.join(row_labels)}.")
        return sheet, legend, pair

    @gpu
    def spillover_row(run_label, owner="", request: gr.Request = None, progress=gr.Progress()):
        if not run_label:
            raise gr.Error("no finished run yet: erase a concept first")
        run_dir = _run_dir(run_label, owner, request)
        manifest = read_manifest(Path(run_dir))
        concept_set = ex.concept_set()
        erased_name = manifest["concepts"][0]
        if erased_name not in concept_set.concepts:
            raise gr.Error(f"{erased_name!r} is not in the concept set, so it has no row")
        bundle = ex.bundle()
        spec = CapabilitySpec(images_per_concept=settings.spillover_images, seed=1000).resolved(bundle)
        evaluator_name = default_evaluator_name(bundle, concept_set)
        evaluator = load_evaluator(evaluator_name, bundle, concept_set)
        store = ex.user_graph(manifest["method"])
        # named as the page names its model, which is how graph_dirs finds the page's graphs
        store.open({**bundle.graph_identity(), "model": ex.settings.model, "method": manifest["method"],
                    "preset": manifest.get("preset"), "target": manifest["config"].get("target"),
                    "evaluator": evaluator_name,
                    "concept_set": concept_set.to_dict(), "template": concept_set.template,
                    "capability": spec.to_dict(), "seeds": spec.seeds(), "images_per_concept": spec.images_per_concept})
        nodes = store.nodes()
        with ex.compute():
            if nodes is None:
                progress(0.05, desc="G₀ of the original model")
                nodes = base_nodes(bundle, concept_set, evaluator, spec)
                store.write_nodes(nodes)
            progress(0.5, desc="G of the erased model")
            start = time.time()
            row = measure_row(bundle, ex.erased_bundle(run_dir), concept_set, evaluator, spec, erased_name, nodes)
        store.add_row(erased_name, row, time.time() - start)
        row.to_csv(Path(run_dir) / "spillover.csv", index=False)
        graphs.update(ex.graph_dirs())
        return plots.spillover_bar_figure(row, erased_name), (
            f"Row added to the graph **{store.folder.name}** ({settings.spillover_images} images per concept). "
            f"Erased concept: G {row[row.affected == erased_name].G_before_top1.iloc[0]:.2f} → "
            f"{row[row.affected == erased_name].G_after_top1.iloc[0]:.2f}."), gr.Dropdown(choices=list(graphs))

    # ---- export --------------------------------------------------------------------------------
    def do_export(run_label, fmt, exported, owner="", request: gr.Request = None):
        if not run_label:
            raise gr.Error("no finished run to export")
        run_dir = _run_dir(run_label, owner, request)
        try:
            folder = ex.export(run_dir, fmt)
        except (ValueError, FileExistsError, RuntimeError, OSError) as err:
            raise gr.Error(str(err)) from None
        # the session remembers what it exported: a push takes nothing else, never a client's path
        exported = list(exported or []) + [str(folder)]
        if fmt == "delta":
            return [str(folder / "delta.safetensors"), str(folder / "manifest.json"), str(folder / "README.md")], str(folder), exported
        return [str(ex.export_zip(folder))], str(folder), exported

    def do_push(exported, repo_id, token):
        from age_explorer.core.export import push_to_hub

        if not exported:
            raise gr.Error("export a run on this page first, then push it")
        if not (token or "").strip() and not settings.allow_server_token:
            raise gr.Error("paste a Hugging Face token with write access: this server does not lend its own token")
        try:
            folder = ex.owned_export(exported[-1])
            url = push_to_hub(folder, (repo_id or "").strip(), token=(token or "").strip() or None,
                              env_token=settings.allow_server_token)
        except (ValueError, RuntimeError, OSError) as err:
            raise gr.Error(str(err)) from None
        return f"Pushed `{folder.name}` to `{repo_id.strip()}`: {url}"

    # ---- generate ------------------------------------------------------------------------------
    @gpu
    def run_generate(prompt: str, seeds_text: str, model_choice: str, owner="", request: gr.Request = None,
                     progress=gr.Progress()):
        try:
            seed_list = parse_seeds(seeds_text, limit=16)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if not prompt or not prompt.strip():
            raise gr.Error("the prompt is empty: type something such as 'a red circle'")
        progress(0, desc="loading model")
        runs = ex.finished_runs(_owner(owner, request))
        bundle = ex.erased_bundle(runs[model_choice]) if model_choice in runs else ex.bundle()
        with warnings.catch_warnings(record=True) as caught, ex.compute():
            warnings.simplefilter("always", PromptWarning)
            images = generate(bundle, [prompt], seed_list,
                              progress=lambda done, total: progress(done / total, desc="generating"))
        for w in caught:
            if issubclass(w.category, PromptWarning):
                gr.Warning(str(w.message))
        return [(to_pil(img, 128), f"seed {s}") for img, s in zip(images, seed_list)]

    # ---- read-only queries (API endpoints; MCP tools when launched with mcp_server=True) -----------
    def _answer(query, *args):
        try:
            return query(ex, *args)
        except ValueError as err:
            raise gr.Error(str(err)) from None

    def list_graphs() -> list[dict]:
        """List the concept graphs: name, erasure method, preset, target, rows measured, images per concept."""
        return _answer(tools.list_graphs)

    def list_concepts(graph: str = "") -> list[dict]:
        """List the concepts of a graph (default: the first) with their groups and baseline capability G0.

        Args:
            graph: a graph name from list_graphs, or empty for the first graph.
        """
        return _answer(tools.list_concepts, graph)

    def concept_spillover(concept: str, graph: str = "") -> dict:
        """How much erasing a concept lowered every other concept's capability (Δ = G0 − G after), largest first.

        Args:
            concept: the erased concept, e.g. "red circle".
            graph: a graph name from list_graphs, or empty for the first graph.
        """
        return _answer(tools.concept_spillover, concept, graph)

    def nearest_concepts(concept: str, k: int = 5, graph: str = "") -> list[dict]:
        """The k concepts nearest to a concept in the spillover graph (largest mean Δ in both directions).

        Args:
            concept: a concept of the graph, e.g. "red circle".
            k: how many neighbours to return.
            graph: a graph name from list_graphs, or empty for the first graph.
        """
        return _answer(tools.nearest_concepts, concept, int(k), graph)

    # ---- layout --------------------------------------------------------------------------------
    with gr.Blocks(title="AGE Explorer") as demo:
        gr.Markdown("# AGE Explorer\nSee and steer concept erasure in text-to-image diffusion models. "
                    + ex.status_line() + "".join(f"\n\n**Warning**: {w}" for w in ex.warnings))
        saved_job = gr.BrowserState("", storage_key="age_explorer_job")
        job_id = gr.State("")
        owner_token = gr.BrowserState("", storage_key="age_explorer_owner")
        owner = gr.State("")  # the browser's secret, copied on load; empty for API clients
        history = gr.State([])
        exported = gr.State([])  # export folders this session made, newest last
        with gr.Tabs():
            with gr.Tab("Concept graph", id="graph"):
                with gr.Row():
                    graph_dd = gr.Dropdown(graph_names, value=graph_names[0] if graph_names else None, label="Graph", elem_id="graph_dd")
                    group_radio = gr.Radio(groupings, value=groupings[0] if groupings else None, label="Group by")
                    threshold = gr.Slider(0, 1, 0.3, step=0.05, label="Show edges with Δ ≥", elem_id="threshold")
                    concept_dd = gr.Dropdown(concepts, value=None, label="Concept", elem_id="concept_dd")
                init = graph_outputs(graph_names[0] if graph_names else None, 0.3, groupings[0] if groupings else None, None)
                graph_view = concept_graph(init[0])
                details = gr.Markdown(init[2], elem_id="graph_details")
                row_plot = gr.Plot(label="Spillover of the selected concept")
                heatmap = gr.Plot(init[1], label="Δ heatmap")
                with gr.Row():
                    other_dd = gr.Dropdown(["(none)"] + graph_names, value="(none)", label="Compare with", elem_id="compare_dd")
                diff_plot = gr.Plot(label="Difference", elem_id="diff_plot")
                with gr.Row():
                    umap_btn = gr.Button("UMAP of the concepts", elem_id="umap_btn")
                    measure = gr.Radio(["text_l2", "text_cosine", "output_distance"], value="text_l2", label="Similarity measure")
                    scatter_btn = gr.Button("Similarity vs Δ", elem_id="scatter_btn")
                umap_plot = gr.Plot(elem_id="umap_plot")
                scatter_plot = gr.Plot(elem_id="scatter_plot")
            with gr.Tab("Erase", id="erase"):
                with gr.Row():
                    erase_choice = gr.Dropdown(concepts if ex.is_toy else [], multiselect=True, label="Concepts to erase", elem_id="erase_concepts")
                    free_text = gr.Textbox(label="or type concepts (comma-separated)", visible=not ex.is_toy)
                with gr.Row():
                    method = gr.Radio(["age", "esd", "uce"], value="age", label="Method", elem_id="method")
                    preset = gr.Dropdown([p for p in PRESETS], value="toy" if ex.is_toy else "imagenette", label="Preset", elem_id="preset")
                    iterations = whole_number(value=None, label="Model steps (blank: preset)", precision=0, elem_id="iterations")
                    lam = gr.Number(value=1.0, label="λ (AGE)")
                    search = gr.Radio(["gumbel", "damage"], value="gumbel", label="AGE target search")
                    target = gr.Textbox(value="", label="ESD/UCE target")
                with gr.Row():
                    vocab = gr.Dropdown([PRESET_VOCAB, "toy"] if ex.is_toy else [PRESET_VOCAB, "imagenet", "en3k"],
                                        value=PRESET_VOCAB, label="AGE candidate vocabulary")
                    own_candidates = gr.Textbox(label="or your own candidates (comma-separated)")
                with gr.Row():
                    start_btn = gr.Button("Erase", variant="primary", elem_id="start_btn")
                    cancel_btn = gr.Button("Cancel", elem_id="cancel_btn")
                    resume_btn = gr.Button("Resume", elem_id="resume_btn")
                queue_md = gr.Markdown()
                progress_html = gr.HTML(_progress_html(None), js_on_load=None)
                status_md = gr.Markdown(elem_id="job_status")
                with gr.Row():
                    loss_plot = gr.Plot()
                    targets_plot = gr.Plot()
                    preview = gr.Image(label="preview", height=160)
                timer = gr.Timer(1.0, active=False)
            with gr.Tab("Before / after", id="compare"):
                with gr.Row():
                    run_dd = gr.Dropdown(list(ex.finished_runs()), label="Finished run", elem_id="run_dd")
                    refresh_btn = gr.Button("Refresh runs")
                    seeds = gr.Textbox("0-3", label="Seeds")
                    show_btn = gr.Button("Show before / after", variant="primary", elem_id="show_btn")
                sheet = gr.Image(label="original | erased (| ESD of the same concepts, when run), same seeds",
                                 type="pil", elem_id="before_after", show_label=True, interactive=False)
                legend = gr.Markdown(elem_id="before_after_legend")
                slider = gr.ImageSlider(label="one pair", type="pil", elem_id="slider")
                spill_btn = gr.Button("Measure the spillover row and add it to the graph", elem_id="spill_btn")
                spill_plot = gr.Plot()
                spill_md = gr.Markdown()
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", value="a red circle", elem_id="prompt")
                    gen_seeds = gr.Textbox(label="Seeds", value="0-3", elem_id="seeds")
                    gen_model = gr.Dropdown(["original"] + list(ex.finished_runs()), value="original", label="Model")
                gen_btn = gr.Button("Generate", variant="primary", elem_id="generate_btn")
                gen_gallery = gr.Gallery(label="Samples", columns=8, height=220, object_fit="contain", elem_id="gallery")
            with gr.Tab("Export", id="export"):
                with gr.Row():
                    export_run_dd = gr.Dropdown(list(ex.finished_runs()), label="Finished run")
                    fmt = gr.Radio(["delta", "diffusers"], value="delta", label="Format")
                    export_btn = gr.Button("Export", variant="primary", elem_id="export_btn")
                files = gr.File(label="Download", file_count="multiple", elem_id="export_files")
                export_folder = gr.Textbox(label="Export folder", interactive=False)
                with gr.Row():
                    repo = gr.Textbox(label="Hub repo id (owner/name)")
                    token = gr.Textbox(label="Hub token (write access)" + (
                        "; empty: the server's HF_TOKEN" if settings.allow_server_token else ""), type="password")
                    push_btn = gr.Button("Push to the Hub")
                push_md = gr.Markdown()

        graph_inputs = [graph_dd, threshold, group_radio, concept_dd]
        graph_outs = [graph_view, heatmap, details, row_plot]
        for trigger in (graph_dd.change, threshold.release, group_radio.change):
            trigger(graph_outputs, graph_inputs, graph_outs, api_visibility="private")
        concept_dd.change(graph_outputs, graph_inputs, graph_outs, api_name="select_concept", api_visibility=ui_api)
        graph_view.select(on_node_click, None, concept_dd, api_visibility="private")
        other_dd.change(difference, [graph_dd, other_dd, group_radio], diff_plot, api_visibility="private")
        umap_btn.click(umap_view, [graph_dd, concept_dd], umap_plot, api_name="umap", api_visibility=ui_api)
        scatter_btn.click(scatter_view, [graph_dd, measure], scatter_plot, api_name="similarity", api_visibility=ui_api, **COMPUTE_SLOT)
        start_btn.click(start_erase, [erase_choice, free_text, method, preset, iterations, lam, search, target,
                                      vocab, own_candidates, owner],
                        [job_id, saved_job, timer, history, queue_md], api_name="start_erase", api_visibility=ui_api)
        timer.tick(tick, [job_id, history, owner], [timer, progress_html, status_md, loss_plot, targets_plot, preview, history],
                   show_progress="hidden", api_visibility="private")
        job_box, job_json = gr.Textbox(visible=False), gr.Textbox(visible=False)
        job_box.submit(job_status_json, [job_box, owner], job_json, api_name="job_status", api_visibility=ui_api)
        cancel_btn.click(cancel, [job_id, owner], queue_md, api_name="cancel", api_visibility=ui_api)
        resume_btn.click(resume, [job_id, owner], [queue_md, timer], api_name="resume", api_visibility=ui_api)
        demo.load(reattach, [saved_job, owner_token], [job_id, timer, owner, owner_token], api_visibility="private")
        refresh_btn.click(refresh_runs, owner, [run_dd, export_run_dd], api_name="runs", api_visibility=ui_api)
        show_btn.click(show_before_after, [run_dd, seeds, owner], [sheet, legend, slider], api_name="before_after", api_visibility=ui_api, **COMPUTE_SLOT)
        spill_btn.click(spillover_row, [run_dd, owner], [spill_plot, spill_md, graph_dd], api_name="spillover", api_visibility=ui_api, **COMPUTE_SLOT)
        gen_btn.click(run_generate, [prompt, gen_seeds, gen_model, owner], gen_gallery, api_name="generate", api_visibility=ui_api, **COMPUTE_SLOT)
        export_btn.click(do_export, [export_run_dd, fmt, exported, owner], [files, export_folder, exported], api_name="export",
                         api_visibility=ui_api)
        push_btn.click(do_push, [exported, repo, token], push_md, api_name="push", api_visibility=ui_api)
        for query in (list_graphs, list_concepts, concept_spillover, nearest_concepts):
            gr.api(query, api_name=query.__name__)
    demo.explorer = ex
    return demo
