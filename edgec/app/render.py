"""Rich rendering of API results (tables, trees). Imports nothing heavy."""
from __future__ import annotations

import contextlib
import json
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.tree import Tree

console = Console()
err_console = Console(stderr=True)


def error_line(label: str, message: str) -> None:
    """One line on stderr; the message is plain text (shapes like [3, 4] are not rich markup)."""
    from rich.text import Text

    err_console.print(Text.assemble((f"{label}: ", "bold red"), " ".join(message.split())), soft_wrap=True)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if n >= 1_000:
        return f"{n / 1e3:.1f} k"
    return str(n)


def kv_table(title: str, rows: list[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for k, v in rows:
        table.add_row(k, str(v))
    return table


def rows_table(title: str, columns: list[str], rows: list[list]) -> Table:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(x) for x in r])
    return table


@contextlib.contextmanager
def spinner(text: str, enabled: bool = True):
    """A live indicator for one long step (stderr, so --json stdout stays clean)."""
    if not enabled or not err_console.is_terminal:
        yield lambda *_: None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task(text, total=None)
        yield lambda desc: progress.update(task, description=f"{text}: {desc}")


@contextlib.contextmanager
def progress_bar(text: str, total: int, enabled: bool = True):
    if not enabled:
        yield None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=False) as progress:
        yield progress


def check_text(check: dict) -> str:
    if not isinstance(check, dict):
        return str(check)
    if "rel_error" not in check:  # an informational record: short key=value pairs
        return ", ".join(f"{k}={_brief(v)}" for k, v in check.items())
    mark = "ok" if check.get("passed", True) else "FAILED"
    return f"{mark}: rel. error {check['rel_error']:.2e} (tol {check['tolerance']:.0e})"


def provenance_tree(title: str, records: list[dict]) -> Tree:
    tree = Tree(title)
    for i, rec in enumerate(records):
        label = f"[bold]{i + 1}. {rec.get('pass')}[/] v{rec.get('version', 1)}"
        if rec.get("summary"):
            label += f" — {rec['summary']}"
        node = tree.add(label)
        params = rec.get("params") or {}
        if params:
            node.add("params: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items())))
        for name, check in (rec.get("checks") or {}).items():
            node.add(f"check {name}: {check_text(check)}")
        metrics = rec.get("metrics")
        if metrics and "before" in metrics:
            b, a = metrics["before"], metrics["after"]
            node.add(f"params {human_count(b['params'])} → {human_count(a['params'])}, "
                     f"bytes {human_bytes(b['bytes'])} → {human_bytes(a['bytes'])}")
        if rec.get("output_digest"):
            node.add(f"digest {rec['output_digest'][:16]}")
    return tree


def _brief(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if len(v) <= 3 else f"{len(v)} items"
    if isinstance(v, dict):
        return f"{{{len(v)} keys}}"
    return str(v)


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def eval_table(res: dict) -> Table:
    """One evaluation as a table (the same rows whatever the file format)."""
    rows = [("file", f"{res['file']} ({res['format']}, {human_bytes(res['file_bytes'])})"),
            ("data", f"{res['data']} — split {res['split']}, n={res['n']}" + (f" ({res['split_note']})" if res.get("split_note") else ""))]
    for k, v in res["metrics"].items():
        rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    rows.append(("params", human_count(res.get("params"))))
    if res.get("onnx_bytes"):
        rows.append(("ONNX size", human_bytes(res["onnx_bytes"])))
    lat = res.get("latency")
    if lat:
        rows.append((f"latency (ORT, batch {lat['batch']}, {lat['threads']} thread(s))",
                     f"{lat['median_ms']:.3f} ms median (p10 {lat['p10_ms']:.3f}, p90 {lat['p90_ms']:.3f}, n={lat['repeats']})"))
    else:
        rows.append(("latency", res.get("latency_note") or "-"))
    for note in res.get("notes") or []:
        rows.append(("note", note))
    return kv_table(f"eval {res['file']}", rows)


class TrainProgress:
    """Turns edgec.train progress events into a rich progress bar with loss and the validation metric."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.last = ""

    def __enter__(self):
        if self.enabled:
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(),
                                     TextColumn("{task.fields[status]}"), console=err_console)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        if not self.progress:
            return
        kind = event.get("event")
        if kind == "start":
            done = (event["start_epoch"] - 1) * event["steps_per_epoch"]
            self.task = self.progress.add_task("fine-tuning", total=event["total_steps"], completed=done, status="")
        elif kind == "step" and self.task is not None:
            self.progress.update(self.task, completed=event["global_step"],
                                 description=f"epoch {event['epoch']}/{event['epochs']}",
                                 status=f"loss {event['loss']:.4f}{self.last}")
        elif kind == "epoch" and self.task is not None:
            m = event["monitor"]
            self.last = f" | val {m} {event['val'][m]:.4f} (best epoch {event['best_epoch']})"
            self.progress.update(self.task, status=f"train loss {event['train_loss']:.4f}{self.last}")
            self.progress.console.print(f"epoch {event['epoch']}/{event['epochs']}: train loss {event['train_loss']:.4f}, "
                                        + ", ".join(f"val {k} {v:.4f}" for k, v in event["val"].items()
                                                    if isinstance(v, float) and k != "wa")
                                        + (" *" if event["is_best"] else ""), highlight=False)


def finetune_table(res: dict) -> Table:
    best = res["best"]
    rows = [("output", res["output"]), ("data", f"{res['data']} ({res['task']})"),
            ("best epoch", f"{res['best_epoch']} of {len(res['history'])} (by val {res['monitor']})")]
    rows += [(f"val {k}", f"{v:.4f}") for k, v in best.items() if isinstance(v, float)]
    rows += [("steps", res["steps"]), ("processes", res["world_size"]),
             ("time", f"{res['seconds']:.1f} s"), ("params", human_count(res["params"]))]
    rows += [("note", n) for n in res.get("notes") or []]
    return kv_table("finetune", rows)


def profile_table(res: dict) -> Table:
    key = res["key"]
    shape = "; ".join(f"{i['name']} {i['shape']}" for i in key["inputs"])
    title = (f"latency table {res['output']} ({'cached' if res['cache_hit'] else 'measured'}): "
             f"{key['runtime']} {key['runtime_version']}, {key['threads']} thread(s), {key['cpu']}, {shape}")
    lowest = min(res["densities"])
    cols = ["unit", "kind", "width", "dense ms", "share"] + [f"{p} @{lowest:g} ms" for p in res["patterns"]]
    rows = [[u["name"], u["kind"], u["width"], f"{u['dense_ms']:.4f}", f"{u['share']:.1%}"] +
            [f"{u[f'{p}@{lowest:g}_ms']:.4f}" if f"{p}@{lowest:g}_ms" in u else "-" for p in res["patterns"]]
            for u in res["units"]]
    rows.append(["whole model (dense)", "", "", f"{res['dense_ms']:.4f}", "100%"] + [""] * len(res["patterns"]))
    table = rows_table(title, cols, rows)
    for w in res.get("warnings") or []:
        table.caption = (table.caption or "") + f"warning: {w}\n"
    return table


def prune_table(res: dict) -> Table:
    rows = [("output", res["output"]), ("mode", res["mode"]), ("pattern", f"{res['pattern']} → {res['pattern_chosen']}"),
            ("budget", f"{res['budget_ms']:.3f} ms"), ("dense (measured)", f"{res['dense_ms']:.3f} ms"),
            ("estimated", f"{res['estimated_ms']:.3f} ms (latency-model error {res['model_error']:+.1%})"),
            ("measured", f"{res['measured_ms']:.3f} ms — speedup {res['speedup']:.2f}×"),
            ("params", f"{human_count(res['params_before'])} → {human_count(res['params_after'])}"),
            ("FLOP reduction", f"{res['flop_reduction']:.2f}×"), ("retries", res["retries"])]
    dens = res.get("densities") or {}
    if dens:
        rows.append(("densities", ", ".join(f"{k} {v:.2f}" for k, v in dens.items() if v < 1) or "all 1.0"))
    rows += [("note", n) for n in res.get("notes") or []]
    return kv_table("prune", rows)
