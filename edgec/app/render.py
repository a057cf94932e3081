"""Rich rendering of API results (tables, trees). Imports nothing heavy."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

from rich.console import Console, Group
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

console = Console()
err_console = Console(stderr=True)


def error_line(label: str, message: str) -> None:
    """One line on stderr; the message is plain text (shapes like [3, 4] are not rich markup)."""
    err_console.print(Text.assemble((f"{label}: ", "bold red"), plain(message)), soft_wrap=True)


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


def safe(value) -> Text:
    """``value`` as rich ``Text``: never parsed as markup, and without escape sequences, control characters (but
    newlines) or bidi overrides. Table cells, titles and tree labels go through it, because many hold strings read
    from files (provenance, configs, names) that must reach the terminal as text and nothing else."""
    if isinstance(value, Text):
        return value
    return Text(_CELL_ESCAPES.sub(" ", str(value)))


def kv_table(title: str, rows: list[tuple[str, object]]) -> Table:
    table = Table(title=safe(title), show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    for k, v in rows:
        table.add_row(safe(k), safe(v))
    return table


def rows_table(title: str, columns: list[str], rows: list[list]) -> Table:
    table = Table(title=safe(title), title_justify="left")
    for c in columns:
        table.add_column(safe(c))
    for r in rows:
        table.add_row(*[safe(x) for x in r])
    return table


# Progress when stderr is not a terminal (CI logs): plain lines, never control characters, elapsed seconds
# rather than wall-clock times (logs stay comparable between runs). EDGEC_PROGRESS_INTERVAL: heartbeat seconds.
LOG_INTERVAL_S = float(os.environ.get("EDGEC_PROGRESS_INTERVAL") or 5)
_BIDI = "\u200e\u200f\u202a-\u202e\u2066-\u2069"  # direction overrides: text that displays as other text
_ESCAPES = re.compile(rf"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x1f\x7f-\x9f{_BIDI}]")
_CELL_ESCAPES = re.compile(rf"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x09\x0b-\x1f\x7f-\x9f{_BIDI}]")


def plain(text: str) -> str:
    """``text`` on one line without escape sequences or control characters."""
    return " ".join(_ESCAPES.sub(" ", str(text)).split())


class LogLines:
    """Progress as plain stderr lines: one when the step changes (``step``), and the current status again
    every ``interval`` seconds while nothing else was printed (``update`` only changes that status)."""

    def __init__(self, prefix: str, interval: float | None = None):
        self.prefix, self.interval = plain(prefix), interval or LOG_INTERVAL_S
        self.status = ""
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self):
        self.step("")
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_):
        self.done.set()
        self.thread.join()
        if exc_type is None:
            self.step("done")

    def _write(self) -> None:
        """One line (the lock held): prefix, status, seconds since the start."""
        self.last = time.monotonic()
        text = self.prefix + (f": {self.status}" if self.status else "")
        sys.stderr.write(f"{text} [{self.last - self.start:.0f} s]\n")
        sys.stderr.flush()

    def step(self, status: str) -> None:
        with self.lock:
            self.status = plain(status)
            self._write()

    def update(self, status: str) -> None:
        with self.lock:
            self.status = plain(status)

    def _heartbeat(self) -> None:
        while not self.done.wait(min(1.0, self.interval)):
            with self.lock:
                if time.monotonic() - self.last >= self.interval:
                    self._write()


class _LogTasks:
    """The part of rich's ``Progress`` that the recipe runner uses, as log lines."""

    def __init__(self, log: LogLines):
        self.log = log

    def add_task(self, description: str, **_) -> int:
        self.log.step(description)
        return 0

    def update(self, _task, description: str | None = None, **_) -> None:
        if description:
            self.log.step(description)

    def advance(self, _task, advance: int = 1) -> None:
        pass


def logging_progress() -> bool:
    """True when progress goes to logs (stderr is not a terminal) rather than to a live display."""
    return not err_console.is_terminal


@contextlib.contextmanager
def spinner(text: str, enabled: bool = True):
    """A live indicator for one long step on stderr (so --json stdout stays clean); in logs (stderr not a
    terminal) plain lines instead, also under --json. ``enabled=False`` turns off only the live display."""
    if logging_progress():
        with LogLines(text) as log:
            yield log.step
        return
    if not enabled:
        yield lambda *_: None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task(text, total=None)
        yield lambda desc: progress.update(task, description=f"{text}: {desc}")


@contextlib.contextmanager
def progress_bar(text: str, total: int, enabled: bool = True):
    """A bar over ``total`` steps (rich ``Progress``); in logs, plain lines (see ``spinner``)."""
    if logging_progress():
        with LogLines(text) as log:
            yield _LogTasks(log)
        return
    if not enabled:
        yield None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=False) as progress:
        yield progress


def check_text(check: dict) -> str:
    if not isinstance(check, dict):
        return str(check)
    if "rel_error" not in check or "tolerance" not in check:  # informational: short key=value pairs
        return ", ".join(f"{k}={_brief(v)}" for k, v in check.items())
    mark = "ok" if check.get("passed", True) else "FAILED"
    return f"{mark}: rel. error {check['rel_error']:.2e} (tol {check['tolerance']:.0e})"


def provenance_tree(title: str, records: list[dict]) -> Tree:
    """The records as a tree; every string in them came from a file, so each label is :func:`safe` text."""
    tree = Tree(safe(title))
    for i, rec in enumerate(records):
        label = Text.assemble((f"{i + 1}. {plain(rec.get('pass'))}", "bold"), f" v{plain(rec.get('version', 1))}")
        if rec.get("summary"):
            label.append(f" — {plain(rec['summary'])}")
        node = tree.add(label)
        params = rec.get("params") or {}
        if params:
            node.add(safe("params: " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items()))))
        for name, check in (rec.get("checks") or {}).items():
            node.add(safe(f"check {name}: {check_text(check)}"))
        metrics = rec.get("metrics")
        if metrics and "before" in metrics:
            b, a = metrics["before"], metrics["after"]
            node.add(f"params {human_count(b['params'])} → {human_count(a['params'])}, "
                     f"bytes {human_bytes(b['bytes'])} → {human_bytes(a['bytes'])}")
        if rec.get("output_digest"):
            node.add(safe(f"digest {rec['output_digest'][:16]}"))
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
    rows = [("file", f"{res['input']} ({res['kind']}, {human_bytes(res['file_bytes'])})"),
            ("data", f"{res['data']} — split {res['split']}, n={res['n']}" + (f" ({res['split_note']})" if res.get("split_note") else ""))]
    for k, v in res["metrics"].items():
        rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    if res.get("task") == "causal_lm":
        if "bits_per_byte" not in res["metrics"]:
            rows.append(("bits_per_byte", "unavailable (the data has no text byte count for this split)"))
        if res.get("tokens") is not None:
            rows.append(("tokens scored", f"{res['tokens']:,}" + (f" ({res['text_bytes']:,.0f} text bytes)"
                                                                  if res.get("text_bytes") else "")))
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
    return kv_table(f"eval {res['input']}", rows)


def generate_view(res: dict) -> Table:
    """``edgec generate``: the text (or ids), how it stopped, and prefill/decode tokens per second."""
    def speed(part: dict) -> str:
        rate = part.get("tokens_per_s")
        return f"{rate:,.1f} tokens/s ({part['tokens']} tokens, {part['seconds'] * 1000:.1f} ms)" if rate else \
            f"- ({part['tokens']} tokens)"

    s = res["sampling"]
    how = "greedy" if s["mode"] == "greedy" else "sampled: " + ", ".join(
        f"{k} {s[k]}" for k in ("temperature", "top_k", "top_p", "seed") if s.get(k) is not None)
    rows = []
    if res.get("text") is not None:
        rows.append(("text", res["text"]))
    rows += [("generated ids", ",".join(map(str, res["generated_ids"])) or "-"),
             ("prompt", f"{len(res['prompt_ids'])} tokens"),
             ("stopped", res["stopped"] + (f" (eos id {res['eos_id']})" if res["stopped"] == "eos" else "")),
             ("tokens", how),
             (f"prefill ({res['runtime']}, {res['threads']} thread(s))", speed(res["prefill"])),
             (f"decode ({res['runtime']}, batch 1)", speed(res["decode"]))]
    return kv_table(f"generate {res['input']}", rows)


class TrainProgress:
    """Turns edgec.train progress events into a rich progress bar with loss and the validation metric; in
    logs (stderr not a terminal) into plain lines: each epoch, and the current step every few seconds."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.progress = None
        self.to_log = False
        self.log = None  # LogLines from the "start" event on (only the main process of a DDP run emits events)
        self.task = None
        self.last = ""

    def __enter__(self):
        if self.enabled and logging_progress():
            self.to_log = True
        elif self.enabled:
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(),
                                     TextColumn("{task.fields[status]}"), console=err_console)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)
        if self.log:
            self.log.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        if self.to_log:
            return self._log_event(event)
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
            self.progress.console.print(epoch_line(event), highlight=False)

    def _log_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            self.log = self.log or LogLines("fine-tuning").__enter__()
            self.log.step(f"{event['total_steps']} steps from epoch {event['start_epoch']}")
        elif self.log is None:
            return
        elif kind == "step":
            self.log.update(f"epoch {event['epoch']}/{event['epochs']}, step {event['global_step']}, "
                            f"loss {event['loss']:.4f}")
        elif kind == "epoch":
            self.log.step(epoch_line(event))


def epoch_line(event: dict) -> str:
    """One line per finished epoch: train loss, the validation metrics, ``*`` on a new best."""
    return (f"epoch {event['epoch']}/{event['epochs']}: train loss {event['train_loss']:.4f}, "
            + ", ".join(f"val {k} {v:.4f}" for k, v in event["val"].items() if isinstance(v, float) and k != "wa")
            + (" *" if event["is_best"] else ""))


def finetune_table(res: dict) -> Table:
    best = res["best"]
    rows = [("output", res["output"]), ("data", f"{res['data']} ({res['task']})"),
            ("best epoch", f"{res['best_epoch']} of {len(res['history'])} (by val {res['monitor']})")]
    rows += [(f"val {k}", f"{v:.4f}") for k, v in best.items() if isinstance(v, float)]
    rows += [("steps", res["steps"]), ("processes", res["world_size"]),
             ("time", f"{res['seconds']:.1f} s"), ("params", human_count(res["params"]))]
    if res.get("fsdp"):
        f = res["fsdp"]
        rows.append(("fsdp", f"{human_bytes(max(f['params_per_rank_bytes']))} of {human_bytes(f['params_total_bytes'])} "
                             f"parameters per process ({f['units']} shard units)"))
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


SKIPPED_SHOWN = 20  # longer skip lists are cut here (the JSON has them all)


def skipped_table(skipped: list[dict], what: str = "layer") -> Table | None:
    """The layers (or channel groups) a command left unchanged, with the reason; None when there are none."""
    if not skipped:
        return None
    table = rows_table(f"skipped: {len(skipped)} {what}(s) left unchanged", [what, "reason"],
                       [[s["layer"], s["reason"]] for s in skipped[:SKIPPED_SHOWN]])
    if len(skipped) > SKIPPED_SHOWN:
        table.caption = f"... and {len(skipped) - SKIPPED_SHOWN} more (--json lists all)"
    return table


def _with_skipped(table: Table, skipped: list[dict], what: str = "layer", *extra) -> Group:
    return Group(*[x for x in (table, *extra, skipped_table(skipped, what)) if x is not None])


def gate_rows(report: dict | None) -> list[tuple[str, str]]:
    """One row per quality gate (edgec.app.gates): limit, value and margin."""
    rows = []
    for g in (report or {}).get("checks", []):
        name = f"gate {g['gate']}" + (f" {g['metric']}" if g.get("metric") else "")
        value = "not measured" if g["value"] is None else f"{g['value']:.4g}"
        margin = "" if g["margin"] is None else f", margin {g['margin']:+.4g}"
        rows.append((name, f"{'ok' if g['passed'] else 'FAILED'}: {value} (limit {g['limit']:g}{margin})"))
    return rows


def warnings_text(notes: list) -> list[Text]:
    """Notes that must not be missed (e.g. one-shot pruning's likely accuracy damage), in bold red."""
    return [Text(str(n), style="bold red") for n in notes or [] if str(n).startswith("WARNING")]


def prune_table(res: dict) -> Group:
    rows = [("output", res["output"]), ("mode", res["mode"]), ("pattern", f"{res['pattern']} → {res['pattern_chosen']}"),
            ("budget", f"{res['local_budget_ms']:.3f} ms" + (f" ({res['latency_ratio']:g} × dense, measured side by side)"
                                                              if res["budget_from"] == "ratio" else "")),
            ("dense (measured)", f"{res['dense_ms']:.3f} ms"),
            ("estimated", f"{res['estimated_ms']:.3f} ms (latency-model error {res['model_error']:+.1%})"),
            ("measured", f"{res['measured_ms']:.3f} ms — speedup {res['speedup']:.2f}×"),
            ("params", f"{human_count(res['before']['params'])} → {human_count(res['params'])}"),
            ("FLOP reduction", f"{res['flop_reduction']:.2f}×"), ("retries", res["retries"])]
    dens = res.get("densities") or {}
    if dens:
        rows.append(("densities", ", ".join(f"{k} {v:.2f}" for k, v in dens.items() if v < 1) or "all 1.0"))
    rows += [("note", n) for n in res.get("notes") or []]
    skipped = res.get("skipped") or []
    changed = sum(1 for v in dens.values() if v < 1)
    rows.append(("groups", f"{changed} changed, {len(skipped)} skipped"))
    rows += gate_rows(res.get("gates"))
    return _with_skipped(kv_table("prune", rows), skipped, "group", *warnings_text(res.get("notes")))


def _io_list(values: list[dict]) -> str:
    return "; ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in values)


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}×{v}" for k, v in counts.items())


def zoo_table(res: dict) -> Table:
    return rows_table("edgec model zoo", ["name", "params", "inputs", "task", "description"], [
        [x["name"], human_count(x["params"]), _io_list(x["inputs"]), x["task"], x["summary"]] for x in res["models"]])


def created_table(name: str, res: dict) -> Table:
    return kv_table(f"created {name}", [
        ("output", res["output"]), ("params", human_count(res["params"])),
        ("file size", human_bytes(res["file_bytes"])), ("digest", res["digest"][:16]),
        ("config", ", ".join(f"{k}={v}" for k, v in sorted(res["config"].items())))])


def imported_table(res: dict) -> Table:
    return kv_table("imported BERT", [
        ("output", res["output"]), ("params", human_count(res["params"])),
        ("layers", res["config"].get("num_hidden_layers")), ("hidden", res["config"].get("hidden_size")),
        ("digest", res["digest"][:16])])


def scaffold_table(res: dict) -> Group:
    rows = [("scaffold", res["summary"]),
            ("parameters", ", ".join(f"{k}={v}" for k, v in res["scaffold_params"].items())),
            ("params (training)", f"{human_count(res['before']['params'])} → {human_count(res['params'])}")]
    rows += [(f"check {k}", check_text(v)) for k, v in res["checks"].items()]
    return _with_skipped(kv_table("scaffold", rows + [("output", res["output"])]), res.get("skipped") or [])


def fold_view(res: dict) -> Group:
    rows = [(p["pass"], (p["summary"] or "-") + ("" if not p["checks"] else
             "  [" + "; ".join(check_text(c) for c in p["checks"].values()) + "]")) for p in res["passes"]]
    table = kv_table("fold", rows + [
        ("params", f"{human_count(res['before']['params'])} → {human_count(res['params'])}"),
        ("output", res["output"])])
    skipped = res.get("skipped") or []
    if res["folded"]:
        return _with_skipped(table, skipped)
    return _with_skipped(table, skipped, "layer", Text.assemble((plain(res["summary"]), "yellow"),
                                                                f" (copied unchanged to {plain(res['output'])})"))


def _lowbit_rows(res: dict) -> list[tuple]:
    sz, layers = res["size"], res["lowbit_layers"] or []
    forms_used: dict = {}
    for layer in layers:
        forms_used[layer.get("form", "?")] = forms_used.get(layer.get("form", "?"), 0) + 1
    return [("low-bit layers", f"{len(layers)} ({_counts(forms_used)})"),
            ("low-bit weights vs fp32", f"{sz['lowbit_weight_ratio']:.3f}"),
            ("file vs fp32 file", f"{sz['file_ratio']:.3f} (fp32 layers: {len(res['fp32_layers'] or [])})")]


def export_table(res: dict) -> Table:
    parity = res["checks"]["ort_parity"]
    rows = [("output", res["output"]), ("size", human_bytes(res["file_bytes"])), ("opset", res["opset"]),
            ("weights", res["weights"])]
    if res.get("size"):
        rows += _lowbit_rows(res)
    rows += [("params", human_count(res["params"])), ("sha256", res["sha256"][:16]),
             ("provenance", f"{res['provenance_records']} record(s) in metadata 'edgec.provenance'")]
    for name, p in parity["parity"].items():
        rows.append((f"ORT parity {name.replace('_', ' ')} {p['shape']}", check_text(p | {
            "tolerance": parity["tolerance"], "passed": p["rel_error"] <= parity["tolerance"]})))
    if res.get("card"):
        rows.append(("model card", f"{res['card']} (and metadata 'edgec.card')"))
    return kv_table("export", rows + _forms_rows(res) + gate_rows(res.get("gates")))


def _forms_rows(res: dict) -> list[tuple]:
    """How the INT2 layers were written, forms=auto's whole-file check, and both precisions' scores."""
    f = res.get("forms")
    if not f:
        return []
    rows = [("forms", f"{f['requested']} → {_counts(f['layers'])}; activations {f['activation_precision']} "
                      f"({f['int8_activation_layers']} int8 layer(s)); session {f['target_config']}")]
    whole = f.get("whole_model") or {}
    if whole.get("runs"):
        last = whole["runs"][-1]
        verdict = "passed" if whole.get("passed") else "NOT within noise"
        fell = f", {len(whole['cast_fallbacks'])} layer(s) fell back to cast" if whole.get("cast_fallbacks") else ""
        rows.append(("vs fp32 export (side by side)",
                     f"{last['ms']:.3f} ms vs {last['fp32_ms']:.3f} ms = {last['ratio']:.2f}x ({verdict}{fell})"))
    elif whole.get("reason"):
        rows.append(("vs fp32 export", whole["reason"]))
    scores = res.get("activation_precisions")
    if scores:
        for prec, row in scores["precisions"].items():
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items() if isinstance(v, (int, float)))
            mark = " (chosen)" if prec == scores["chosen"] else ""
            rows.append((f"{prec} activations{mark}", f"{metrics}; parity rel error {row['parity_rel_error']:.2g}"))
    return rows


def _inspect_rows(res: dict) -> list[tuple]:
    file = ("file", f"{res['input']} ({human_bytes(res['file_bytes'])})")
    if res["kind"] == "onnx":
        return [file, ("producer", res["producer"]), ("arch", res["arch"] or "-"),
                ("IR / opsets", f"{res['ir_version']} / {res['opsets']}"),
                ("params", f"{human_count(res['params'])} ({res['initializer_dtypes']})"),
                ("inputs", _io_list(res["inputs"])), ("outputs", _io_list(res["outputs"])),
                ("nodes", res["nodes"]), ("ops", _counts(res["ops"]))]
    return [file, ("arch", res["arch"]), ("params", human_count(res["params"])),
            ("tensor bytes", human_bytes(res["bytes"])), ("digest", res["digest"][:16]),
            ("inputs", _io_list(res["spec"]["inputs"])), ("modules", _counts(res["modules"])),
            ("weight bits", ", ".join(f"{b}: {v['layers']} layer(s), {human_count(v['weights'])} weights"
                                      for b, v in res["bits"].items())),
            ("scaffolds", ", ".join(f"{s['kind']}@{s['module']}" for s in res["scaffolds"]) or "none")]


def inspect_view(res: dict, layers: bool = False) -> Group:
    """The file's summary, its weight layers (``layers``, checkpoints only) and its provenance tree."""
    parts = [kv_table(f"inspect {res['input']}", _inspect_rows(res))]
    if layers and res["kind"] == "checkpoint":
        parts.append(rows_table("layers", ["layer", "type", "bits", "weights", "group", "act"], [
            [x["layer"], x["type"], x["bits"], f"{x['weights']:,}", x.get("group_size", "-"), x.get("act", "-")]
            for x in res["layers"]]))
    return Group(*parts, provenance_tree("provenance", res["provenance"]))


def plan_table(recipe, plan: dict) -> Table:
    """A recipe's dry run (``plan.describe()``)."""
    gates = plan.get("gates")
    return rows_table(f"plan: {recipe} → {plan['out_dir']}", ["#", "step", "parameters"], [
        [i + 1, s["run"], ", ".join(f"{k}={v}" for k, v in s["params"].items())]
        for i, s in enumerate(plan["steps"])] + ([["", "gates", ", ".join(f"{k}={v}" for k, v in gates.items())]]
                                                  if gates else []))


def step_details(run: str, res: dict) -> str:
    """One readable line per step kind for the summary table."""
    if run in ("zoo.create", "import.hf"):
        return f"{human_count(res['params'])} params, {human_bytes(res['file_bytes'])}"
    if run.startswith("scaffold."):
        return res["summary"]
    if run == "finetune":
        m = res["monitor"]
        return f"best epoch {res['best_epoch']}/{len(res['history'])}: val {m} {res['best'][m]:.3f}, {res['seconds']:.0f} s"
    if run == "fold":
        parts = [f"{p['pass']} {check_text(c)}" for p in res["passes"] for c in (p.get("checks") or {}).values()]
        return "; ".join(parts) or res["summary"]
    if run == "export":
        return f"{human_bytes(res['file_bytes'])}, ORT parity {check_text(res['checks']['ort_parity'])}"
    if run == "eval":
        shown = ("perplexity", "bits_per_byte", "accuracy", "uar", "ccc", "mae", "map", "map50")
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in res["metrics"].items() if k in shown)
        lat = res.get("latency")
        return metrics + (f", {lat['median_ms']:.2f} ms (batch {lat['batch']})" if lat else "")
    if run == "inspect":
        return f"{len(res['provenance'])} provenance record(s), {human_count(res['params'])} params"
    if run == "prune":
        return (f"budget {res['local_budget_ms']:.3f} ms: measured {res['measured_ms']:.3f} ms (estimated "
                f"{res['estimated_ms']:.3f}), {res['speedup']:.2f}× vs dense, {res['mode']}")
    if run == "profile":
        return f"{len(res['units'])} groups, dense {res['dense_ms']:.3f} ms" + (" (cached)" if res["cache_hit"] else "")
    return ""


def report_view(report: dict) -> Group:
    """A recipe run's report: one row per step, then where the report and the last artifact are."""
    table = Table(title=safe(f"recipe {report['name']}: {report['status']}"), title_justify="left")
    for col in ("#", "step", "status", "s", "output", "details"):
        table.add_column(col)
    for e in report["steps"]:
        res = e.get("result") or {}
        details = e.get("error") or step_details(e["run"], res)
        table.add_row(*map(safe, (e["step"], e["run"], e["status"], f"{e['seconds']:.1f}",
                                  Path(str(res.get("output", "-"))).name, details)))
    outputs = [e["result"]["output"] for e in report["steps"] if e.get("result", {}).get("output")]
    footer = Text(f"report: {report['out_dir']}/report.json" + (f"   artifact: {outputs[-1]}" if outputs else ""))
    gates = report.get("gates")
    if not gates:
        return Group(table, footer)
    if "error" in gates:
        return Group(table, Text(f"gates: {gates['error']}", style="bold red"), footer)
    line = (f"gates on {gates['artifact']}: " + ("all passed" if gates["passed"] else "FAILED: "
            + "; ".join(gates["failed"]) + f" (moved to {gates['rejected']})"))
    return Group(table, kv_table("gates", gate_rows(gates)), Text(line, style="" if gates["passed"] else "bold red"),
                 footer)
