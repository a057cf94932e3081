"""The model card `edgec export` writes: `MODEL.card.md` next to `MODEL.onnx`, and the same content as JSON in
the ONNX metadata under ``edgec.card`` (Netron shows it under the model's properties).

It says what the file is (task, inputs, preprocessing, class labels), how good and how fast it was found to
be (metrics with the digest of their data, latency with the machine it was measured on, size, bit widths),
how it was made (every pass with its checks) and which gates it passed. It is built only from the checkpoint,
the export record and what export measured deterministically, so the same inputs give the same bytes: no
timestamps, no paths, no file names of outputs, and no value timed at export (a latency gate's measured
value is in the command's JSON result; the card says the gate passed and on which machine).
"""
from __future__ import annotations

import math
from pathlib import Path

CARD_KEY = "edgec.card"
CARD_FORMAT = "edgec.card/1"
MAX_FIXED_POINT_ROUNDS = 16


def card_path(onnx_path: str | Path) -> Path:
    """``MODEL.onnx`` → ``MODEL.card.md`` (same folder)."""
    p = Path(onnx_path)
    return p.with_name(f"{p.stem}.card.md")


# --- building ------------------------------------------------------------------------------------------------

def _scalars(d) -> dict:
    """The plain scalar entries of a dict (nested tables and long lists are left to the provenance)."""
    if not isinstance(d, dict):
        return {}
    return {str(k): v for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _checks(checks) -> dict:
    return {str(k): _scalars(v) for k, v in checks.items()} if isinstance(checks, dict) else {}


def passes(records: list) -> list[dict]:
    """Every provenance record in order: pass, version, its scalar parameters, summary and checks."""
    out = []
    for r in records:
        if not isinstance(r, dict):
            continue
        row = {"pass": r.get("pass"), "version": r.get("version"), "params": _scalars(r.get("params"))}
        if isinstance(r.get("summary"), str):
            row["summary"] = r["summary"]
        row["checks"] = _checks(r.get("checks"))
        if isinstance(r.get("skipped"), list):
            row["skipped"] = len(r["skipped"])
        out.append(row)
    return out


def _after(records: list, i: int) -> list[str]:
    return [str(r.get("pass")) for r in records[i + 1:] if isinstance(r, dict)]


def recorded_metrics(records: list) -> list[dict]:
    """Validation metrics that fine-tuning recorded, with their data digest and the passes applied since."""
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or r.get("pass") != "finetune":
            continue
        params, metrics = r.get("params") or {}, r.get("metrics") or {}
        if not isinstance(params, dict) or not isinstance(metrics, dict):
            continue
        out.append({"source": "finetune (best epoch)", "split": "val", "data": params.get("data"),
                    "data_digest": params.get("data_digest"), "metrics": _scalars(metrics.get("val")),
                    "passes_after": _after(records, i)})
    return out


def recorded_latency(records: list) -> list[dict]:
    """What pruning recorded about latency: budget, estimate and the machine the table describes."""
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or r.get("pass") != "prune.alcs":
            continue
        params = r.get("params") if isinstance(r.get("params"), dict) else {}
        metrics = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        table = params.get("table") if isinstance(params.get("table"), dict) else {}
        row = {"source": "prune", **{k: params.get(k) for k in ("budget_ms", "latency_ratio", "threads", "batch")},
               **{k: metrics[k] for k in ("estimated_ms", "estimated_table_ms", "measured_ms") if k in metrics},
               "machine": {k: table.get(k) for k in ("runtime", "cpu", "threads") if k in table},
               "checks": _checks(r.get("checks")), "passes_after": _after(records, i)}
        out.append(row)
    return out


def preprocessing(model, features: dict | None) -> dict:
    """Audio models: every log-mel parameter (as the data was featurised at export, else as fine-tuned, else
    the model's defaults). Other models take their input tensors as they are."""
    from edgec.data.features import feature_params

    extra = model.spec.extra if isinstance(model.spec.extra, dict) else {}
    if extra.get("features") != "log-mel" and "n_mels" not in extra:
        return {"kind": "none", "note": "the inputs are fed as given (no feature extraction in edgec)"}
    trained = next((r["params"].get("data_options") or {} for r in reversed(model.provenance)
                    if isinstance(r, dict) and r.get("pass") == "finetune" and isinstance(r.get("params"), dict)), {})
    f = features or {}
    n_mels = f.get("n_mels") or trained.get("n_mels") or extra.get("n_mels") or model.config.get("n_mels") or 40
    return feature_params(int(f.get("sample_rate", 16000)), int(n_mels), int(f.get("frames") or
                          trained.get("frames") or 200), str(f.get("normalize", "utterance")))


def _classes(model, evaluation: dict | None) -> tuple[list | None, str | None]:
    if evaluation and evaluation.get("classes"):
        return list(evaluation["classes"]), "data given at export"
    for r in reversed(model.provenance):
        params = r.get("params") if isinstance(r, dict) and r.get("pass") == "finetune" else None
        if isinstance(params, dict) and isinstance(params.get("classes"), list):
            return list(params["classes"]), "finetune record"
    return None, None


def card_gates(report: dict | None) -> list[dict]:
    """The gates as the card keeps them: limits and outcomes; values only where they are deterministic
    (metrics, not latency; the size is the card's ``size.file_bytes``)."""
    rows = []
    for r in (report or {}).get("checks", []):
        row = {"gate": r["gate"], "metric": r["metric"], "limit": r["limit"], "passed": r["passed"]}
        if r["gate"] in ("min_metric", "max_metric_drop"):
            row["value"] = r["value"]
        rows.append(row)
    return rows


def base_card(model, record: dict, measured, features: dict | None = None) -> dict:
    """Everything except the size and the gates (they depend on the final bytes: :func:`attach`)."""
    from edgec.app.inspection import bits_summary, layer_bits
    from edgec.core.spec import spec_to_dict

    evaluation = getattr(measured, "evaluation", None)
    records = list(model.provenance) + [record]
    classes, classes_from = _classes(model, evaluation)
    metrics = recorded_metrics(records)
    if evaluation:
        metrics.insert(0, {"source": "this file, at export", "split": evaluation["split"], "n": evaluation["n"],
                           "data": evaluation["data"], "data_digest": evaluation["data_digest"],
                           "metrics": _scalars(evaluation["metrics"])})
    latency = recorded_latency(model.provenance)
    if getattr(measured, "latency_ms", None) is not None:
        latency.append({"source": "export latency gate", "machine": measured.machine,
                        "note": "measured at export; the value is in the export result (it differs run to run)"})
    lowbit = record.get("lowbit") or {}
    return {
        "format": CARD_FORMAT, "arch": model.arch, "task": model.spec.task, "config": model.config,
        "checkpoint_digest": model.digest(), "params": model.param_count(),
        "inputs": model.spec.to_json()["inputs"], "outputs": list(model.spec.outputs),
        "spec": spec_to_dict(model.spec), "preprocessing": preprocessing(model, features),
        "classes": classes, "classes_from": classes_from, "metrics": metrics,
        "latency": latency or [{"note": "not measured: no prune record and no latency gate; "
                                        "`edgec eval MODEL.onnx --data D` measures it"}],
        "weights": record.get("params", {}).get("weights"), "opset": record.get("params", {}).get("opset"),
        "bits": bits_summary(layer_bits(model.gm)),
        "lowbit_layers": len(lowbit.get("layers") or []), "fp32_layers": list(lowbit.get("fp32_layers") or []),
        "runtime": runtime(record), "passes": passes(records), "tools": record.get("tools"),
    }


def form_counts(layers: list[dict]) -> dict:
    """{form: number of low-bit layers written in it}, by form name."""
    counts: dict = {}
    for r in layers:
        counts[r["form"]] = counts.get(r["form"], 0) + 1
    return dict(sorted(counts.items()))


def runtime(record: dict) -> dict | None:
    """How the INT2 layers are written and the onnxruntime session the file was verified in (run it there)."""
    lowbit = record.get("lowbit")
    if not lowbit:
        return None
    parity = record["checks"]["ort_parity"]
    return {"forms": form_counts(lowbit["layers"]), "activation_precision": lowbit.get("activation_precision"),
            "int8_activation_layers": lowbit.get("int8_activation_layers", 0),
            "verified_session_config": parity.get("session_config") or {}, "parity_rel_error": parity["rel_error"]}


def finite(value):
    """NaN/Infinity (e.g. a CCC of constant predictions) as null: strict JSON readers, edgec's own included,
    refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def attach(onnx_bytes: bytes, base: dict, decide) -> tuple[bytes, dict, object]:
    """Embed the card under ``CARD_KEY``. The card states the final file's size, and the file's size includes
    the card, so the size is found as a fixed point: ``decide(file_bytes) -> (size dict, gate rows, extra)``
    must be non-decreasing in length as the size grows (digits and a pass→fail flip only lengthen it), so the
    iteration from the card-less size only climbs and stops within a few rounds. Returns (bytes, card, extra)."""
    from edgec.core.graph import canonical_json
    from edgec.onnx.export import metadata_entry

    size = len(onnx_bytes)
    for _ in range(MAX_FIXED_POINT_ROUNDS):
        size_info, gate_rows, extra = decide(size)
        card = finite(dict(base, size=size_info, gates=gate_rows))
        entry = metadata_entry(CARD_KEY, canonical_json(card))  # appended: the model is not parsed again
        if len(onnx_bytes) + len(entry) == size:
            return onnx_bytes + entry, card, extra
        size = len(onnx_bytes) + len(entry)
    raise RuntimeError("the model card's size did not settle")  # unreachable: the length only climbs


def read_card(onnx_bytes: bytes) -> dict | None:
    """The card in an ONNX file's metadata (bounded JSON read), or None."""
    import onnx

    from edgec.core.limits import load_json

    proto = onnx.load_model_from_string(onnx_bytes)
    for entry in proto.metadata_props:
        if entry.key == CARD_KEY:
            card = load_json(entry.value, f"ONNX metadata '{CARD_KEY}'")
            return card if isinstance(card, dict) else None
    return None


# --- markdown --------------------------------------------------------------------------------------------------

def _cell(v) -> str:
    """A table cell: numbers short, text on one line with the markdown table separator escaped."""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if v is None:
        return "-"
    text = v if isinstance(v, str) else str(v)
    return " ".join(text.split()).replace("|", "\\|").replace("`", "'")


def _table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _kv(pairs: list[tuple[str, object]]) -> list[str]:
    return _table(["", ""], [[k, v] for k, v in pairs])


def _metric_lines(card: dict) -> list[str]:
    if not card["metrics"]:
        return ["Not measured: export with `--data D` to score this file (and gate it with `--min-metric`)."]
    names = list(dict.fromkeys(k for m in card["metrics"] for k in m["metrics"]))
    return _table(["source", "split", "data", "data digest", *names, "passes since"], [
        [m["source"], m["split"], m.get("data"), str(m.get("data_digest") or "")[:16],
         *[m["metrics"].get(k) for k in names], ", ".join(m.get("passes_after") or []) or "-"]
        for m in card["metrics"]])


def _latency_lines(card: dict) -> list[str]:
    rows = []
    for row in card["latency"]:
        machine = row.get("machine") or {}
        where = ", ".join(f"{k} {v}" for k, v in machine.items() if k in ("runtime", "runtime_version", "cpu",
                                                                           "threads"))
        figures = ", ".join(f"{k} {_cell(row[k])}" for k in ("budget_ms", "latency_ratio", "estimated_ms",
                                                                "measured_ms") if row.get(k) is not None)
        rows.append([row.get("source", "-"), figures or row.get("note", "-"), where or "-"])
    return _table(["source", "figures (ms)", "machine"], rows)


def _runtime_section(rt: dict | None) -> list[tuple[str, list[str]]]:
    if not rt:
        return []
    config = ", ".join(f"`{k}={v}`" for k, v in rt["verified_session_config"].items()) or \
        "a default `onnxruntime.InferenceSession` (no session options needed)"
    return [("Runtime", _kv([("low-bit forms", ", ".join(f"{k} × {v}" for k, v in rt["forms"].items())),
                             ("activations", f"{rt['activation_precision']} ({rt['int8_activation_layers']} "
                                             f"layer(s) with int8 activations)"),
                             ("verified in", config), ("parity (relative error)", rt["parity_rel_error"])]))]


def _sections(card: dict) -> list[tuple[str, list[str]]]:
    pre = card["preprocessing"]
    classes = card["classes"]
    size = card["size"]
    return [
        ("Inputs", _table(["name", "shape", "dtype"], [[i["name"], " × ".join(map(str, i["shape"])), i["dtype"]]
                                                     for i in card["inputs"]])
         + ["", f"Outputs: {', '.join(card['outputs'])}."]),
        ("Preprocessing", _kv(list(pre.items()))),
        ("Class labels", [", ".join(f"{i}: {_cell(c)}" for i, c in enumerate(classes)) + f" (from the "
                          f"{card['classes_from']})"] if classes else ["Not recorded (export with `--data D`)."]),
        ("Metrics", _metric_lines(card)),
        ("Latency", _latency_lines(card)),
        ("Size", _kv([("file bytes", size["file_bytes"]), ("params", card["params"]),
                      ("weights", card["weights"]), ("low-bit layers", card["lowbit_layers"])])),
        ("Bit widths", _table(["bits", "layers", "weights"], [[b, v["layers"], v["weights"]]
                                                             for b, v in card["bits"].items()])),
        *_runtime_section(card.get("runtime")),
        ("Passes", _table(["#", "pass", "version", "summary", "checks"], [
            [i, p["pass"], p["version"], p.get("summary"),
             "; ".join(f"{k}: {'passed' if c.get('passed') else 'FAILED' if 'passed' in c else 'recorded'}"
                       for k, c in p["checks"].items()) or "-"] for i, p in enumerate(card["passes"], 1)])),
        ("Gates", _table(["gate", "metric", "limit", "value", "passed"], [
            [g["gate"], g["metric"], g["limit"], g.get("value"), "yes" if g["passed"] else "NO"]
            for g in card["gates"]]) if card["gates"] else ["None were set."]),
    ]


def markdown(card: dict) -> str:
    """The card as markdown: readable sections, then the exact JSON of the ONNX metadata."""
    from edgec.core.graph import canonical_json

    lines = [f"# Model card: {_cell(card['arch'])}", "",
             *_kv([("task", card["task"]), ("architecture", card["arch"]), ("parameters", card["params"]),
                   ("opset", card["opset"]), ("checkpoint digest", card["checkpoint_digest"]),
                   ("edgec", (card.get("tools") or {}).get("edgec"))]), ""]
    for title, body in _sections(card):
        lines += [f"## {title}", "", *body, ""]
    lines += ["## Machine-readable", "", f"The same card as JSON (ONNX metadata key `{CARD_KEY}`):", "",
              "```json", canonical_json(card), "```", ""]
    return "\n".join(lines)


__all__ = ["CARD_FORMAT", "CARD_KEY", "attach", "base_card", "card_gates", "card_path", "finite", "markdown", "passes",
           "preprocessing", "read_card", "recorded_latency", "recorded_metrics"]
