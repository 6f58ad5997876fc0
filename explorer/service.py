"""What the explorer's callbacks call: graphs on disk, the job store and worker, before/after images.

No training maths here: everything is delegated to ``core``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from age_explorer.core.app.cpu_split import CpuSplit
from age_explorer.core.app.evaluate import default_out as evaluation_dir
from age_explorer.explorer.workflows import RunEntry, find_run, list_runs
from age_explorer.core.backends import backend_for
from age_explorer.core.bundle import ModelBundle, load_bundle, weights_revision
from age_explorer.core.device import resolve_device
from age_explorer.core.export.lora import DEFAULT_RANK
from age_explorer.core.graph.concept_sets import ConceptSet, load_concept_set
from age_explorer.core.graph.store import DamagedGraphError, GraphStore, model_graphs
from age_explorer.core.app.job_store import JobStore, UnknownJobError, default_data_dir
from age_explorer.core.app.worker import WorkerProcess
from age_explorer.core.paths import assets_dir
from age_explorer.core.runs import RunManifest, run_weights


log = logging.getLogger("age_explorer.explorer")
# an absolute POSIX path in a message (not a URL's "//host/..." nor a ratio such as "3/4")
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;:()\[\]{}<>]+")


@dataclass
class Settings:
    model: str = "toy"
    device: str = "auto"
    dtype: str = "float32"
    data_dir: str | None = None
    start_worker: bool = True
    worker_start_delay: float = 10.0  # seconds after start-up (a submitted job starts it at once)
    mcp: bool = False  # launched with mcp_server=True: only the read-only queries are public API
    # images per concept of a spillover row computed from the page; as the shipped graphs, since at 16
    # differences under ~0.05 are noise
    spillover_images: int = 32
    # the classifier of spillover rows, attacks and evaluations (toy, hf:<hub id>, clip:<hub id or folder>,
    # torchvision-resnet50) and the concept set of spillover rows and evaluations (the model's own, netfive,
    # imagenette or a CSV); None: the model's (toy: its own; Stable Diffusion: hf:microsoft/resnet-50 over
    # NetFive for rows and Imagenette for attacks and evaluations)
    evaluator: str | None = None
    concept_set: str | None = None
    # "Push to the Hub" with an empty token field uses the server's HF_TOKEN only when the operator
    # opts in (a private Space of one user); otherwise any visitor could write with the owner's token.
    allow_server_token: bool = False
    # A shared server open to strangers (on by default on a Space): each session sees and cancels only
    # its own jobs and runs; shipped graphs stay shared. Off: one user's tool, everything shared.
    public: bool = False
    # Public mode: the most jobs (queued and running) one session may have at once, so that one
    # visitor cannot fill the queue that everyone shares.
    max_jobs_per_session: int = 3

    def __post_init__(self):
        if not isinstance(self.max_jobs_per_session, int) or self.max_jobs_per_session < 1:
            raise ValueError(f"the jobs per session must be a whole number of at least 1, not "
                             f"{self.max_jobs_per_session!r}")


BROWSER_KEY_FILE = "browser-state.key"


def browser_state_key(data_dir: Path) -> str:
    """The key with which the page encrypts what it keeps in a browser (the visitor's secret, their job),
    made once and kept in ``DATA/browser-state.key`` (owner-only), so a page still reads them after a
    server restart. Deleting the file makes a new key at the next start (rotation): every browser then
    starts as a new visitor."""
    path = Path(data_dir) / BROWSER_KEY_FILE
    for _ in range(2):
        try:
            key = path.read_text().strip()
        except FileNotFoundError:
            key = ""
        if len(key) >= 32:
            if path.stat().st_mode & 0o077:  # e.g. copied with another umask: readable by others
                path.chmod(0o600)
                log.warning("%s was readable by other users; it is now owner-only", path)
            return key
        # a missing or cut-short key: write a new one in full under a temporary name, then link it in
        # place, so two servers starting at once agree on one key and none reads half a file
        fresh = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            if key:  # a damaged key is replaced
                path.unlink(missing_ok=True)
            os.link(fresh, path)
        except FileExistsError:
            pass  # another server wrote it first: read theirs
        finally:
            fresh.unlink(missing_ok=True)
    raise OSError(f"cannot keep the page's key in {path}")


class Explorer:
    """State shared by all sessions of one app: the model, the graphs, the job store and its worker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir()
        self.warnings: list[str] = []  # problems found at start-up, shown at the top of the page
        self.store = JobStore(self.data_dir)
        self.browser_key = browser_state_key(self.data_dir)
        self.device = str(resolve_device(settings.device))
        # Jobs run in a worker process, beside the server's request threads. On the CPU, the job and
        # the page's model work split the cores; requests enter through ``compute()``.
        self.cpu_split = CpuSplit.of() if self.device == "cpu" else None
        self.worker = WorkerProcess(self.data_dir, self.device, self.cpu_split.job_threads if self.cpu_split else None
                                    ) if settings.start_worker else None
        if self.worker:
            # The worker's imports (torch, diffusers, transformers: seconds of a core) would compete with
            # the first paint, so it starts a little later, or with the first job submitted before that;
            # jobs left queued or interrupted by a restart wait for it in the store.
            starter = threading.Timer(settings.worker_start_delay, self.worker.ensure_alive)
            starter.daemon = True
            starter.start()
            self.worker.supervise(self.store)
        self._bundle: ModelBundle | None = None
        self._graph_folders: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._weights_lock = threading.RLock()
        self._export_lock = threading.Lock()

    @contextmanager
    def compute(self):
        """Context for a request's model work (generation, spillover): its share of the CPU cores."""
        if self.cpu_split is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.cpu_split.request_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # ---- the model ---------------------------------------------------------------------------------
    def bundle(self) -> ModelBundle:
        with self._lock:
            if self._bundle is None:
                self._bundle = load_bundle(self.settings.model, device=self.device, dtype=self.settings.dtype)
            return self._bundle

    @contextmanager
    def model(self, run_dir: str | None = None):
        """The served model for one request's work: the original, or with ``run_dir``'s delta swapped in
        (``core.runs.run_weights``), so viewing a run never loads a second copy of the base. Requests
        take turns: while one holds the model, its weights may be a run's."""
        bundle = self.bundle()
        with self._weights_lock:
            if run_dir is None:
                yield bundle
            else:
                with run_weights(bundle, run_dir):
                    yield bundle

    @property
    def is_toy(self) -> bool:
        return self.settings.model == "toy"

    @property
    def model_kind(self) -> str:
        """The backend of the served model ("toy", "stable-diffusion"), known without loading it."""
        path = Path(self.settings.model)
        backend = backend_for(self.settings.model, path if path.is_dir() else None)
        return backend.name if backend else "stable-diffusion"

    def status_line(self) -> str:
        gpu = "a CUDA GPU" if self.device.startswith("cuda") else "the CPU (no GPU found)"
        if self.is_toy:
            return f"Model: the embedded toy world (5 shapes × 5 colours) on {gpu}."
        try:
            self.bundle()
        except Exception as err:  # shown on the page and in the log; the rest of the app still works
            log.warning("model %r could not be loaded: %s", self.settings.model, err)
            return (f"**Model {self.settings.model!r} could not be loaded**: {err}\n\n"
                    "Graphs computed for this model in the data folder stay browsable (the shipped graphs are "
                    "the toy model's: start with `--model toy`); erasing and generating need the weights.")
        return f"Model: `{self.settings.model}` on {gpu}."

    def toy_concepts(self) -> list[str]:
        """The toy model's concepts (its erase list when no graph is shipped); none for other models."""
        return self.bundle().backend.concept_set().concepts if self.is_toy else []

    def concept_set(self) -> ConceptSet:
        """The concepts of a spillover row: the server's set, else the toy world's own or NetFive."""
        name = self.settings.concept_set or ("toy" if self.is_toy else "netfive")
        return load_concept_set(name, self.bundle())

    # ---- graphs ----------------------------------------------------------------------------------
    def graph_dirs(self) -> dict[str, Path]:
        """Shipped graphs of this model (assets/graphs) and graphs computed here (data dir)."""
        roots = [(assets_dir() / "graphs", "shipped"), (self.data_dir / "graphs", "computed")]
        return model_graphs(roots, self.settings.model, weights_revision(self.settings.model), self._readable)

    def graph_folder(self, name: str) -> Path:
        """The folder of this model's graph ``name``, looking again on disk for one made since the last look."""
        if name not in self._graph_folders:
            self._graph_folders = self.graph_dirs()
        if name not in self._graph_folders:
            raise ValueError(f"no graph named {name!r} for this model")
        return self._graph_folders[name]

    def methods_table(self):
        """The ranked methods table of this model's complete-enough graphs (core/graph/methods.py)."""
        from age_explorer.core.graph.methods import methods_table

        return methods_table(self.comparable_graphs())

    def comparable_graphs(self) -> list[Path]:
        """The graphs of the first (most complete) graph's concept set: another set's figures do not compare."""
        folders = list(self.graph_dirs().values())
        if not folders:
            return []
        concepts = GraphStore(folders[0]).meta()["concept_set"]["concepts"]
        return [f for f in folders if GraphStore(f).meta()["concept_set"]["concepts"] == concepts]

    def method_rows(self, erased: str):
        """Each graph's spillover row of ``erased`` (index: method label, columns: affected concepts)."""
        import pandas as pd

        from age_explorer.core.graph.methods import graph_label

        rows = {}
        for folder in self.comparable_graphs():
            store = GraphStore(folder)
            edges = store.edges()
            row = edges[edges.erased == erased]
            if len(row):
                rows[graph_label(store.meta())] = row.set_index("affected").delta_top1
        return pd.DataFrame(rows).T

    def _readable(self, store: GraphStore) -> bool:
        """A damaged graph is skipped with a warning (log and page), so it cannot stop the server."""
        try:
            store.check()
        except DamagedGraphError as err:
            if str(err) not in self.warnings:
                self.warnings.append(str(err))
                log.warning("skipped graph %s: %s", store.folder.name, err)
            return False
        return store.nodes() is not None

    def user_graph(self, method: str) -> GraphStore:
        """Rows computed from the page go into one graph per method, next to the jobs."""
        return GraphStore(self.data_dir / "graphs" / f"page-{method}")

    # ---- jobs ------------------------------------------------------------------------------------
    def submit(self, kind: str, config: dict, owner: str | None = None) -> str:
        """Queue a job of ``kind`` for this server's worker (restarted first if it died)."""
        limit = self.settings.max_jobs_per_session if self.settings.public else None
        job_id = self.store.submit(kind, config, device=self.device, session=owner, session_limit=limit)
        if self.worker:
            self.worker.ensure_alive()
        return job_id

    def submit_erase(self, concepts: list[str], method: str, preset: str | None, options: dict,
                     owner: str | None = None) -> str:
        return self.submit("erase", {"model": self.settings.model, "method": method, "preset": preset,
                                     "options": {"concepts": concepts, **options}}, owner)

    def submit_attack(self, run_dir: str, config, owner: str | None = None) -> str:
        """A recovery attack (a checked ``AttackConfig``) on a finished run; it writes ``RUN/attacks/``."""
        options = {k: v for k, v in config.to_dict().items() if k != "attack"}
        return self.submit("attack", {"run_dir": run_dir, "attack": config.attack, "options": options,
                                      "evaluator": self.settings.evaluator,
                                      "concept_set": self.settings.concept_set}, owner)

    def submit_evaluate(self, run_dir: str, config, owner: str | None = None) -> str:
        """An evaluation (a checked ``EvaluationConfig``) of a finished run into ``RUN/evaluation``, as
        ``age-explorer evaluate RUN`` writes it."""
        return self.submit("evaluate", {"model": run_dir, "out": str(evaluation_dir(run_dir)),
                                        "config": config.to_dict()}, owner)

    def job(self, job_id: str, owner: str | None = None):
        """A job the caller may see: in public mode only its own session's, and another's reads as unknown."""
        job = self.store.get(job_id)
        if self.settings.public and (owner is None or job.session != owner):
            raise UnknownJobError(job_id)
        return job

    def jobs_of(self, owner: str | None = None, statuses=("queued", "running", "interrupted")) -> list:
        """The jobs the caller may see (in public mode only its session's) in ``statuses``, oldest first."""
        jobs = [job for status in statuses for job in self.store.list(status=status)]
        if self.settings.public:
            jobs = [job for job in jobs if owner is not None and job.session == owner]
        return sorted(jobs, key=lambda job: job.seq)

    def for_visitor(self, value):
        """``value`` (a job's fields) as a public server shows it: paths in the data folder relative to it,
        and an error as its first line (a worker's error ends with a traceback). Unchanged in local mode."""
        if not self.settings.public:
            return value
        roots = {str(self.data_dir) + os.sep, str(self.data_dir.resolve()) + os.sep}

        def shown(item, key=None):
            if isinstance(item, str):
                if key == "error":
                    return self.without_paths(item.splitlines()[0]) if item else item
                root = next((r for r in roots if item.startswith(r)), None)
                return item[len(root):] if root else item
            if isinstance(item, dict):
                return {k: shown(v, k) for k, v in item.items()}
            if isinstance(item, (list, tuple)):
                return [shown(v) for v in item]
            return item

        return shown(value)

    def without_paths(self, text: str) -> str:
        """A message as a public server shows it: each path in the data folder relative to it (``runs/NAME``),
        any other absolute path by its last part. Unchanged in local mode, where paths help the operator."""
        if not self.settings.public:
            return text
        roots = sorted({str(self.data_dir), str(self.data_dir.resolve())}, key=len, reverse=True)

        def neutral(match: re.Match) -> str:
            path = match.group()
            root = next((r for r in roots if path == r or path.startswith(r + os.sep)), None)
            if root is not None:
                return path[len(root) + 1:] or "the data folder"
            return Path(path).name or path

        return ABSOLUTE_PATH.sub(neutral, text)

    def cancel(self, job_id: str, owner: str | None = None) -> str:
        self.job(job_id, owner)
        return self.store.cancel(job_id)

    def check_worker(self) -> list[str]:
        """Restart a dead worker process and mark the jobs it left "running" as interrupted, so a killed
        worker is noticed by the page's polling, not only by the next submit. Returns those jobs."""
        interrupted = self.store.mark_interrupted(self.device)
        if self.worker:
            self.worker.ensure_alive()
        return interrupted

    def poll(self, job_id: str, owner: str | None = None):
        """A job as the page shows it, after :meth:`check_worker`."""
        self.check_worker()
        return self.job(job_id, owner)

    def resume(self, job_id: str, owner: str | None = None) -> None:
        """Queue an interrupted or failed job again; refused while a live worker still runs it."""
        self.job(job_id, owner)
        self.check_worker()
        self.store.resume(job_id)

    def runs(self, owner: str | None = None) -> list[RunEntry]:
        """Finished runs, newest first: the jobs' (in public mode only ``owner``'s) and DATA/runs/*."""
        return list_runs(self.store, self.settings.model, owner, self.settings.public)

    def run(self, label: str, owner: str | None = None) -> RunEntry:
        """The finished run a page label names (ValueError when there is none, or not the caller's)."""
        return find_run(self.runs(owner), label)

    def esd_counterpart(self, run_dir: str, manifest: RunManifest, owner: str | None = None) -> str | None:
        """The newest finished ESD run of the same concepts, to show beside an AGE run."""
        if manifest.method != "age":
            return None
        for other in self.runs(owner):
            if other.path != run_dir and other.method == "esd" and list(other.concepts) == manifest.concepts:
                return other.path
        return None

    # ---- exports -------------------------------------------------------------------------------
    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    def export(self, run_dir: str, fmt: str, rank: int | str | None = DEFAULT_RANK) -> Path:
        """Export a run into a new folder ``<run>-<format>[-N]``: an export never replaces another.
        ``rank``: the rank of a LoRA export."""
        from age_explorer.core.export.writers import export_run

        run = Path(run_dir)
        base = f"{run.parent.name if run.name == 'run' else run.name}-{fmt}"
        with self._export_lock:
            name, n = base, 1
            while (self.exports_dir / name).exists():
                n += 1
                name = f"{base}-{n}"
            return export_run(run, self.exports_dir, fmt=fmt, name=name, rank=rank)

    def owned_export(self, folder: str) -> Path:
        """``folder`` if it is an export this server wrote: a real folder directly in the exports folder
        with no symbolic link in it. Callers pass only folders that their own session exported."""
        root = self.exports_dir.resolve()
        path = Path(folder)
        if path.is_symlink() or not path.is_dir() or path.resolve().parent != root or path.name.startswith("."):
            raise ValueError("only an export made on this page can be pushed: export the run first")
        if any(item.is_symlink() for item in path.rglob("*")):
            raise ValueError(f"export {path.name} holds a symbolic link, so it is not pushed")
        return path

    def export_zip(self, folder: Path) -> Path:
        archive = shutil.make_archive(str(folder), "zip", root_dir=folder)
        return Path(archive)


def before_after_rows(explorer: Explorer, manifest: RunManifest) -> list[tuple[str, str]]:
    """(label, concept) rows: erased concepts, AGE's top target, neighbours, unrelated concepts."""
    concepts = list(manifest.concepts)
    rows = [("erased", c) for c in concepts]
    for concept, targets in (manifest.targets or {}).items():
        if targets:
            rows.append((f"AGE target of {concept}", targets[0][0]))
    if explorer.is_toy:
        world = explorer.bundle().backend.world
        first = concepts[0]
        if first in world.names:
            rows += [("same shape", c) for c in world.same_shape(first)[:2]]
            rows += [("same colour", c) for c in world.same_colour(first)[:2]]
            rows += [("unrelated", c) for c in world.unrelated(first)[:2]]
    seen, unique = set(), []
    for label, concept in rows:
        if concept not in seen:
            seen.add(concept)
            unique.append((label, concept))
    return unique
