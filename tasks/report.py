"""The evaluation report: ``metrics.json``, ``report.html`` and ``report.md`` from one set of records.

:func:`report_records` turns the metrics, the doctor's diagnosis, the champion
comparison and the run's context into plain text records (tables of strings, sentences).
``report.html`` renders them through one Jinja2 template shipped as package data
(``imgflow/tasks/templates/report.html.j2``, autoescape on) and ``report.md`` from the
same records, with HTML and Markdown markup in names escaped: a file or class name is
always shown as text, never interpreted.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from imgflow.tasks.atomic import read_json, write_json, write_text
from imgflow.tasks.metrics import per_class_rows

#: files listed by name in the report when unreadable
SKIPPED_LISTED = 50
#: recall at or above which the first screen says a class is recognised; below the second, not
RECALL_GOOD = 0.8
RECALL_POOR = 0.5
SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}
TEMPLATE = "report.html.j2"

_PLOT_TITLES = {
    "confusion_matrix": "Confusion matrix (rows = true class, columns = predicted)",
    "learning_curves": "Learning curves (history.csv)",
    "reliability": "Calibration: reliability diagram",
    "novelty": "Novelty of the evaluation images vs --ood-dir images",
    "gallery": "Highest-loss images",
    "confused_pairs": "Most-confused class pairs",
    "saliency": "What the model looked at",
}


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def md_text(value: Any) -> str:
    """Text made inert for Markdown: HTML escaped, Markdown markup characters backslash-escaped.

    A class folder named ``<img src=x onerror=alert(1)>`` or a file named
    ``[click](http://evil).png`` shows as written, never as markup.
    """
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(value), quote=False))


def _table(header: Sequence[Any], rows: Iterable[Sequence[Any]], left: int = 1,
           row_classes: Sequence[str] | None = None) -> dict[str, Any]:
    return {"header": [str(h) for h in header], "rows": [[_fmt(v) for v in row] for row in rows],
            "left": left, "row_classes": list(row_classes) if row_classes else None}


def training_sentence(training: dict[str, Any] | None) -> str | None:
    """Which epoch's weights the model kept and why training stopped, in one sentence.

    Args:
        training: any of ``best_epoch`` (1-based), ``epochs_run``, ``epochs`` (configured),
            ``monitor``, ``stopped_early``, ``stop_reason``; missing keys are left out.

    Returns:
        E.g. ``"Weights from epoch 7 of 10, chosen on val_accuracy; training stopped
        early: val_accuracy did not improve for 3 epochs."``, or None without ``best_epoch``
        and ``epochs_run``.
    """
    training = training or {}
    best, run = training.get("best_epoch"), training.get("epochs_run")
    if best is None and run is None:
        return None
    if best is not None:
        text = f"Weights from epoch {best}" + (f" of {run}" if run is not None else "")
        if training.get("monitor"):
            text += f", chosen on {training['monitor']}"
    else:
        text = f"Weights from the last of {run} epochs"
    stopped = training.get("stopped_early")
    if stopped:
        reason = training.get("stop_reason")
        text += "; training stopped early" + (f": {reason}" if reason else "")
    elif stopped is not None and run is not None:
        planned = training.get("epochs")
        text += f"; training ran all {planned if planned is not None else run} epochs"
    return text.rstrip(".") + "."


def where_it_looks(metrics: dict[str, Any]) -> dict[str, str] | None:
    """The first-screen line on where the saliency sits (``metrics["attention"]``), or None without maps.

    Args:
        metrics: the evaluation's metrics, with ``attention`` from
            :func:`imgflow.tasks.attention.attention_shares`.

    Returns:
        ``{"label", "text", "cls"}``; ``cls`` is ``bad`` when an ``attends_to_background``
        finding was raised.
    """
    attention = metrics.get("attention")
    if not attention:
        return None
    parts = []
    for name, row in attention.items():
        part = f"{name} {row['border_share']:.0%} on the border"
        if row.get("transparent_share") is not None:
            part += f", {row['transparent_share']:.0%} on transparent pixels"
        parts.append(part + f" ({row['examples']} example{'s' if row['examples'] != 1 else ''})")
    flagged = any(f.get("code") == "attends_to_background" for f in metrics.get("evaluation_findings", []))
    return {"label": "Where it looks:", "cls": "bad" if flagged else "",
            "text": "share of saliency " + "; ".join(parts) + " (uniform attention puts ~44% on the border band; "
                    "see the saliency plot)."}


def first_screen(metrics: dict[str, Any], diagnosis: dict[str, Any] | None) -> list[dict[str, str]]:
    """The report's opening lines in plain words: what the model learned, what it confuses, the likely reason.

    Args:
        metrics: :func:`imgflow.tasks.metrics.compute_metrics` output.
        diagnosis: ``diagnosis.json`` content, or None.

    Returns:
        ``{"label", "text", "cls"}`` lines (``cls`` is ``good``, ``bad`` or empty).
    """
    lines: list[dict[str, str]] = []
    rows = [(name, metrics["per_class"][name]) for name in metrics["class_names"] if metrics["per_class"][name]["support"]]
    good = [f"{n} (recall {r['recall']:.2f})" for n, r in rows if r["recall"] >= RECALL_GOOD]
    partly = [f"{n} (recall {r['recall']:.2f})" for n, r in rows if RECALL_POOR <= r["recall"] < RECALL_GOOD]
    poor = [f"{n} (recall {r['recall']:.2f})" for n, r in rows if r["recall"] < RECALL_POOR]
    learned = []
    if good:
        learned.append("it recognises " + ", ".join(good))
    if partly:
        learned.append("it partly recognises " + ", ".join(partly))
    if poor:
        learned.append("it does not recognise " + ", ".join(poor))
    lines.append({"label": "What the model learned:", "text": "; ".join(learned) + ".",
                  "cls": "bad" if poor else "good"})
    if metrics.get("most_confused"):
        top = metrics["most_confused"][0]
        lines.append({"label": "What it confuses most:",
                      "text": f"{top['true']} taken for {top['predicted']} "
                              f"({top['count']} of {metrics['per_class'][top['true']]['support']} images).",
                      "cls": ""})
    bad = metrics.get("non_finite_outputs", 0)
    if bad:
        lines.append({"label": "Broken outputs:", "cls": "bad",
                      "text": f"the model produced NaN or infinite outputs for {bad} of {metrics['count']} images; "
                              "they count as wrong and the model cannot be promoted."})
    looks = where_it_looks(metrics)
    if looks is not None:
        lines.append(looks)
    # the evaluation's own findings (attends_to_background) rank with the doctor's
    findings = [f for f in sorted([*(diagnosis or {}).get("findings", []), *metrics.get("evaluation_findings", [])],
                                  key=lambda f: SEVERITY_RANK.get(str(f.get("severity")), 3))
                if f.get("severity") in ("critical", "warning")]
    if findings:
        first = findings[0]
        lines.append({"label": "Most likely reason:", "cls": "bad" if first.get("severity") == "critical" else "",
                      "text": f"{first.get('code', '')}: {first.get('advice', '')}".strip()})
    elif diagnosis is not None:
        lines.append({"label": "Most likely reason:", "cls": "",
                      "text": "the training doctor found no problem in this run."})
    return lines


def attention_records(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The "Where the model looks" section: per-class shares and the evaluation's findings, or None."""
    attention = metrics.get("attention")
    if not attention:
        return None
    rows = [(name, row["border_share"], row.get("transparent_share"), row["examples"]) for name, row in attention.items()]
    findings = [f"{f['code']} ({f['severity']}): {f['advice']}" for f in metrics.get("evaluation_findings", [])]
    return {
        "text": "Share of the saliency maps' mass (the examples of the saliency plot below) on the outer 12.5% "
                "band of each side (43.75% of the area: uniform attention gives ~0.44) and on transparent pixels.",
        "table": _table(["class", "border share", "transparent share", "examples"], rows),
        "findings": findings,
    }


def report_records(
    metrics: dict[str, Any],
    plots: dict[str, Path],
    diagnosis: dict[str, Any] | None,
    champion: dict[str, Any] | None,
    info: dict[str, Any],
    skipped: Sequence[dict[str, str]],
) -> dict[str, Any]:
    """Everything the report shows, as text: the one input of both the HTML and the Markdown."""
    # One flat pass over the report's sections in page order (~90 lines): split up, the page
    # layout would be scattered over helpers that each build one table.
    names = metrics["class_names"]
    acc = metrics["accuracy"]
    no_better = acc <= metrics["majority_accuracy"] + 1e-9
    cards = [
        {"key": "images", "value": str(metrics["count"]), "cls": ""},
        {"key": "accuracy", "value": f"{acc:.3f}", "cls": "bad" if no_better else "good"},
        {"key": "loss", "value": f"{metrics['loss']:.3f}", "cls": ""},
        {"key": "macro F1", "value": f"{metrics['macro']['f1']:.3f}", "cls": ""},
        {"key": "chance / majority", "value": f"{metrics['chance_accuracy']:.2f} / {metrics['majority_accuracy']:.2f}", "cls": ""},
        {"key": "calibration error", "value": f"{metrics['expected_calibration_error']:.3f}", "cls": ""},
        {"key": "unreadable skipped", "value": str(len(skipped)), "cls": ""},
    ]
    if metrics.get("calibration"):
        cal = metrics["calibration"]
        cards.insert(-1, {"key": "ECE after temperature scaling",
                          "value": f"{cal['ece_after']:.3f} (T={cal['temperature']:.2f})", "cls": ""})
    if (metrics.get("novelty") or {}).get("auroc") is not None:
        cards.insert(-1, {"key": "novelty AUROC (--ood-dir)", "value": f"{metrics['novelty']['auroc']:.3f}", "cls": ""})
    if "top_k_accuracy" in metrics:
        cards.insert(2, {"key": f"top-{metrics['top_k']} accuracy", "value": f"{metrics['top_k_accuracy']:.3f}", "cls": ""})
    if metrics.get("non_finite_outputs"):
        cards.insert(2, {"key": "non-finite outputs", "value": str(metrics["non_finite_outputs"]), "cls": "bad"})
    alerts = []
    if no_better:
        alerts.append("The accuracy is no better than always predicting the most frequent class: "
                      "the model has not learned to tell the classes apart.")
    if metrics.get("outputs_were_logits"):
        alerts.append("The model outputs are not probabilities (no softmax on the last layer); "
                      "a softmax was applied for these metrics.")
    if metrics.get("non_finite_outputs"):
        alerts.append(f"{metrics['non_finite_outputs']} of {metrics['count']} images got NaN or infinite model "
                      "outputs (a diverged training?): they have no prediction and count as wrong.")
    context = [(key, str(value)) for key, value in info.items()
               if value is not None and key not in ("run_id", "training") and not isinstance(value, dict)]

    records: dict[str, Any] = {
        "title": f"Evaluation of {info.get('run_id', 'model')}",
        "classes_line": f"{len(names)} classes: {', '.join(names)}",
        "first_screen": first_screen(metrics, diagnosis),
        "cards": cards,
        "alerts": alerts,
        "training": training_sentence(info.get("training")),
        "context": _table(["", "value"], context),
        "diagnosis": None,
        "comparison": None,
    }
    if diagnosis is not None:
        findings = diagnosis.get("findings", [])
        healthy = bool(diagnosis.get("healthy", True))
        rows = [(f.get("severity", ""), f.get("code", ""), f.get("advice", ""),
                 ", ".join(f"{k}={_fmt(v)}" for k, v in (f.get("evidence") or {}).items())) for f in findings]
        records["diagnosis"] = {
            "healthy": healthy,
            "text": f"Training was judged {'healthy' if healthy else 'UNHEALTHY'} ({len(findings)} finding(s)).",
            "table": _table(["severity", "code", "advice", "evidence"], rows, left=4,
                            row_classes=[str(f.get("severity", "")) for f in findings]),
        }
    records["attention"] = attention_records(metrics)
    if champion is not None:
        header = ["metric", f"candidate {champion['candidate_run_id']}", f"champion {champion['champion_run_id']}", "difference"]
        decision = champion.get("decision", "")
        records["comparison"] = {
            "table": _table(header, [(r["metric"], r["candidate"], r["champion"], r["difference"]) for r in champion["rows"]]),
            "decision": decision, "reason": champion.get("reason", ""), "promote": decision == "promote",
        }
    class_rows = [tuple(row.values()) for row in per_class_rows(metrics)]
    class_rows.append(("macro avg", metrics["macro"]["precision"], metrics["macro"]["recall"], metrics["macro"]["f1"], metrics["count"], ""))
    class_rows.append(("weighted avg", metrics["weighted"]["precision"], metrics["weighted"]["recall"], metrics["weighted"]["f1"], metrics["count"], ""))
    records["per_class"] = _table(["class", "precision", "recall", "f1", "support", "predicted"], class_rows)
    records["notes"] = list(metrics["class_notes"].values())
    cm = metrics["confusion_matrix"]
    records["confusion"] = _table(["true \\ predicted", *names], [(names[i], *cm[i]) for i in range(len(names))])
    records["pairs"] = None
    if metrics["most_confused"]:
        pair_rows = [(p["true"], p["predicted"], p["count"], p["fraction_of_true"]) for p in metrics["most_confused"][:5]]
        records["pairs"] = _table(["true class", "predicted as", "images", "share of true class"], pair_rows, left=2)
    records["plots"] = []
    for key, path in plots.items():
        caption = _PLOT_TITLES.get(key, key.replace("_", " "))
        if key == "saliency" and info.get("saliency_method"):
            caption += f" ({info['saliency_method']})"
        records["plots"].append({"key": key, "caption": caption, "uri": _png_data_uri(path), "file": path.name})
    records["skipped"] = {
        "count": len(skipped),
        "table": _table(["file", "reason"], [(s.get("path", ""), s.get("reason", "")) for s in skipped[:SKIPPED_LISTED]], left=2),
    }
    return records


def render_html(records: dict[str, Any]) -> str:
    """``report.html`` from :func:`report_records` through the packaged Jinja2 template (autoescape on)."""
    from importlib.resources import files

    import jinja2

    source = files("imgflow.tasks").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(source).render(r=records)


def _table_md(table: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(md_text(h) for h in table["header"]) + " |", "|" + "---|" * len(table["header"])]
    lines += ["| " + " | ".join(md_text(v) for v in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def render_markdown(records: dict[str, Any], summary: str) -> str:
    """``report.md`` from the same records as the HTML (names escaped, plots linked by file name)."""
    md: list[str] = [f"# {md_text(records['title'])}", ""]
    md += [f"**{line['label']}** {md_text(line['text'])}" + "  " for line in records["first_screen"]]
    md += ["", summary, ""]
    md += [f"> {md_text(alert)}" for alert in records["alerts"]]
    if records["training"]:
        md += ["", md_text(records["training"]), ""]
    diagnosis = records["diagnosis"]
    if diagnosis is not None:
        md += ["## Doctor's findings", "", md_text(diagnosis["text"]), ""]
        if diagnosis["table"]["rows"]:
            md += [_table_md(diagnosis["table"]), ""]
    attention = records.get("attention")
    if attention is not None:
        md += ["## Where the model looks", "", md_text(attention["text"]), "", _table_md(attention["table"]), ""]
        md += [f"> **{md_text(line)}**" for line in attention["findings"]] + ([""] if attention["findings"] else [])
    comparison = records["comparison"]
    if comparison is not None:
        md += ["## Candidate vs champion (same data)", "", _table_md(comparison["table"]), "",
               f"**Decision: {md_text(comparison['decision'])}** — {md_text(comparison['reason'])}", ""]
    md += ["## Metrics per class", "", _table_md(records["per_class"]), ""]
    md += ["## Confusion matrix (rows = true, columns = predicted)", "", _table_md(records["confusion"]), ""]
    if records["pairs"]:
        md += ["### Most-confused pairs", "", _table_md(records["pairs"]), ""]
    md += ["## Plots", ""]
    for plot in records["plots"]:
        md += [f"### {md_text(plot['caption'])}", "", f"![{md_text(plot['caption'])}]({plot['file']})", ""]
    md += ["## Unreadable files", ""]
    if records["skipped"]["count"]:
        md += [f"{records['skipped']['count']} file(s) skipped.", "", _table_md(records["skipped"]["table"]), ""]
    else:
        md += ["None: every file was read.", ""]
    return "\n".join(md)


def summary_markdown(metrics: dict[str, Any], info: dict[str, Any] | None = None) -> str:
    """A short markdown summary (headline numbers, per-class notes) for a Prefect artifact; names escaped."""
    info = info or {}
    lines = [
        f"## Evaluation of {md_text(info.get('run_id', 'model'))} on {md_text(info.get('data', 'data'))}",
        "",
        f"- images: **{metrics['count']}** ({info.get('skipped_count', 0)} unreadable skipped)",
        f"- accuracy: **{metrics['accuracy']:.4f}** (chance {metrics['chance_accuracy']:.4f}, "
        f"majority class {metrics['majority_accuracy']:.4f})",
        f"- loss: {metrics['loss']:.4f}; macro F1: {metrics['macro']['f1']:.4f}; "
        f"ECE: {metrics['expected_calibration_error']:.4f}",
    ]
    if "top_k_accuracy" in metrics:
        lines.append(f"- top-{metrics['top_k']} accuracy: {metrics['top_k_accuracy']:.4f}")
    if metrics.get("non_finite_outputs"):
        lines.append(f"- **non-finite (NaN/inf) outputs: {metrics['non_finite_outputs']} images**, counted wrong")
    lines += ["", *[f"- {md_text(note)}" for note in metrics["class_notes"].values()]]
    return "\n".join(lines)


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    plots: dict[str, Path] | None = None,
    diagnosis: dict[str, Any] | None = None,
    champion: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    skipped: Sequence[dict[str, str]] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and a self-contained ``report.html``.

    Args:
        out_dir: output folder (created).
        metrics: :func:`imgflow.tasks.metrics.compute_metrics` output (extra keys are
            kept in metrics.json).
        plots: plot name -> PNG path (``confusion_matrix``, ``learning_curves``,
            ``reliability``, ``gallery``, ``confused_pairs``, ``saliency`` ...); the
            PNGs are embedded in the HTML as base64 and linked from the markdown.
        diagnosis: the doctor's ``diagnosis.json`` content ({"healthy", "findings"}).
        champion: :func:`imgflow.tasks.registry.compare_models` output with the
            ``decision`` and ``reason`` of the promotion rule, shown side by side.
        info: context shown in the summary (``run_id``, ``data``, ``model_dir``,
            ``split``, ``saliency_method`` ...); ``training`` (``best_epoch``,
            ``epochs_run``, ``monitor``, ``stopped_early``, ``stop_reason``) becomes a sentence.
        skipped: unreadable files, ``{"path", "reason"}`` each.

    Returns:
        {"metrics_json", "report_html", "report_md"} -> written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {k: Path(v) for k, v in (plots or {}).items() if v is not None and Path(v).is_file()}
    info = dict(info or {})
    skipped = list(skipped or [])

    document = dict(metrics)
    document["skipped"] = {"count": len(skipped), "files": skipped}
    document["plots"] = {k: v.name for k, v in plots.items()}
    if champion is not None:
        document["comparison"] = champion
    if diagnosis is not None:
        document["diagnosis"] = diagnosis
    document["info"] = info
    document.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    metrics_path = write_json(out_dir / "metrics.json", document)

    records = report_records(metrics, plots, diagnosis, champion, info, skipped)
    html_path = write_text(out_dir / "report.html", render_html(records))
    md_path = write_text(out_dir / "report.md", render_markdown(records, summary_markdown(metrics, info)))
    return {"metrics_json": metrics_path, "report_html": html_path, "report_md": md_path}


def training_info(model_dir: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Which epoch's weights were kept and why training stopped, read defensively.

    Looks in ``metadata.json`` (top level, then ``metrics``), then ``train_summary.json``.

    Returns:
        The keys found among ``best_epoch``, ``epochs_run``, ``epochs``, ``monitor``,
        ``stopped_early``, ``stop_reason``.
    """
    summary_path = Path(model_dir) / "train_summary.json"
    try:
        summary = read_json(summary_path) if summary_path.is_file() else {}
    except (OSError, ValueError):
        summary = {}
    sources = [metadata, metadata.get("metrics") or {}, summary if isinstance(summary, dict) else {}]
    info: dict[str, Any] = {}
    for key in ("best_epoch", "epochs_run", "monitor", "stopped_early", "stop_reason"):
        for source in sources:
            if source.get(key) is not None:
                info[key] = source[key]
                break
    if isinstance(info.get("stopped_early"), dict):  # {"stopped": bool, "reason": ...} written by training
        detail = info["stopped_early"]
        info["stopped_early"] = bool(detail.get("stopped", detail.get("value", False)))
        info.setdefault("stop_reason", detail.get("reason"))
    epochs = (metadata.get("config") or {}).get("epochs")
    if epochs is not None:
        info["epochs"] = epochs
    for key in ("best_epoch", "epochs_run", "epochs"):
        try:
            info[key] = int(info[key]) if key in info else None
        except (TypeError, ValueError):
            info[key] = None
    return {k: v for k, v in info.items() if v is not None}
