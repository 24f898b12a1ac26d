"""Terminal output (rich, on stderr): build summaries, index info and attribution tables."""
from __future__ import annotations

from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..rankers import features
from ..ui import stderr_console
from . import fmt_number


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def untrained_panel(text: str) -> Panel:
    return Panel(escape(text), title="untrained weights", border_style="bold yellow")


def print_search_settings(search: dict | None) -> None:
    """One line: the search settings measured on the index after a build or compaction (engine._search_tune)."""
    if not search:
        return
    c = stderr_console()
    if search.get("error"):
        c.print(f"[yellow]search settings not measured[/yellow] ({escape(search['error'])}); the defaults apply")
        return
    parts = []
    for name, st in search["stores"].items():
        miss = "" if st["reached_target"] else " [yellow](below the target: the most exact setting tried)[/yellow]"
        parts.append(f"{name}: {st['nprobe']} of {st['nlist']} lists, re-scoring {st['refine']}x, "
                     f"recall@100 {st['recall_at_100']:.3f}{miss}")
    c.print(f"search settings measured for recall@100 >= {search['target_recall_at_100']} in "
            f"{search['seconds']:.1f}s: " + "; ".join(parts))


def print_build_summary(s) -> None:
    c = stderr_console()
    m = s.manifest
    from .._manifest import is_pretrained

    if not is_pretrained(m["models"]):
        c.print(untrained_panel("This index was built with UNTRAINED (randomly initialised) encoders, profile "
                                f"{m['models']['profile']!r}. Its rankings are not meaningful attributions."))
    verb = {"build": "indexed", "resume": "resumed and finished", "append": "appended",
            "overwrite": "rebuilt (the previous index was replaced)"}.get(s.mode, "indexed")
    c.print(f"[bold green]{verb}[/bold green]: {s.added_this_run} records added ({s.encoded_this_run} images encoded "
            f"by this run) into [bold]{escape(str(s.index_dir))}[/bold] in {s.seconds:.1f}s "
            f"({s.throughput:.1f} records/s). The index holds {s.records} live records ({s.images} with images), "
            f"{s.deleted} deleted, in {s.segments} segment{'s' if s.segments != 1 else ''}.")
    merged = getattr(s, "merged", None)
    if merged and merged.get("error"):
        what = "the appended records" if s.mode == "append" else "every record"
        c.print(f"[yellow]{what} are committed, but the segments were not merged[/yellow] "
                f"({escape(merged['error'])}); the index is complete, and queries read each segment on its own: run "
                f"`attrib compact {escape(str(s.index_dir))}` to merge them")
    elif merged:
        c.print(f"merged {merged['segments']} segments (this append's and small ones before it) into one in "
                f"{merged['seconds']:.1f}s: a query reads each segment on its own")
    if s.rejected:
        reasons = ", ".join(f"{n} {escape(r)}" for r, n in sorted(s.reject_reasons.items(), key=lambda kv: -kv[1]))
        c.print(f"[yellow]skipped {s.rejected} records[/yellow] ({reasons}); "
                f"see {escape(str(s.index_dir / 'rejects.jsonl'))}")
    else:
        c.print("skipped 0 records")
    renamed = getattr(s, "renamed_columns", None)
    if renamed:
        names = ", ".join(f"{escape(a)} -> {escape(b)}" for a, b in renamed.items())
        c.print(f"[yellow]renamed {len(renamed)} table columns that clash with the index's own columns[/yellow] "
                f"({names})")
    if s.ignored_files:
        ex = ", ".join(escape(x) for x in s.ignored_files[:3])
        c.print(f"[dim]ignored {len(s.ignored_files)} files that are neither images nor sidecars (e.g. {ex})[/dim]")
    print_search_settings(getattr(s, "search", None))
    cal = getattr(s, "calibration", None)
    if cal and cal.get("skipped"):
        c.print(f"[dim]not calibrated: {escape(cal['skipped'])}[/dim]")
    elif cal:
        share = (f" ({cal['share_of_build']:.0%} of this run's time, {cal['share_of_build_encoding']:.0%} of its "
                 "encoding time)" if cal.get("share_of_build") and cal.get("share_of_build_encoding") else "")
        t = cal.get("test", {})
        c.print(f"[bold green]calibrated[/bold green] fusion weights in {cal['seconds']:.1f}s{share}: "
                f"{cal['queries']} self-made queries ({cal['encoded_images']} images encoded); held-out "
                f"map@100 {fmt_number(t.get('map@100'))}, false attribution "
                f"{fmt_number(t.get('false_attribution_rate'))} -> {escape(str(cal['path']))}")


def print_info(info: dict) -> None:
    c = stderr_console()
    m = info["manifest"]
    if info.get("warning"):
        c.print(untrained_panel(info["warning"]))
    t = Table(title=f"index {escape(info['path'])}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    mod = m["models"]
    t.add_row("format", f"{m['format']} v{m['format_version']}, generation {info['generation']}"
                        + ("" if info["complete"] else " [yellow](build unfinished: rerun it to resume)[/yellow]"))
    t.add_row("created / updated", f"{m['created']} / {m.get('updated', '-')}")
    t.add_row("profile", f"{mod['profile']} ({'UNTRAINED' if info.get('warning') else 'pretrained'})")
    t.add_row("clip", f"{mod['clip']['arch']} / {mod['clip'].get('weights_tag') or 'random init'} "
                      f"(sha256 {mod['clip']['weights_sha256'][:12]}..., {mod['clip']['dim']} dims)")
    t.add_row("dino", f"{mod['dino']['arch']} / {mod['dino'].get('weights_tag') or 'random init'} "
                      f"(sha256 {mod['dino']['weights_sha256'][:12]}..., {mod['dino']['dim']} dims, "
                      f"{mod['dino'].get('input', {}).get('size', '?')}px)")  # vectors written without images: none
    t.add_row("fingerprint", mod["fingerprint"])
    cnt = m["counts"]
    t.add_row("records", f"{info['live']} live ({info['images']} with images, {cnt['caption_only']} caption-only "
                         f"ever added), {info['deleted']} deleted")
    rr = ", ".join(f"{n} {r}" for r, n in cnt.get("reject_reasons", {}).items())
    t.add_row("rejected", f"{cnt['rejected']}" + (f" ({escape(rr)})" if rr else ""))
    d = m["dims"]
    cb = info["codebooks"]
    t.add_row("dims", f"clip {d['clip']}, dino global {d['dino_global']}, patches {d['patch_grid']}x{d['patch_grid']} "
                      f"cells x {d['patch_dims']} dims ({cb['patch_codec']}), caption embeddings "
                      f"{cb.get('caption_codec', '?') if 'caption_clip' in info['sizes'] else 'none stored'}")
    search = info.get("search") or {}

    def probe(k: str, v: dict) -> str:
        if v["nlist"] <= 1:
            return ""
        s = search.get(k) or {}
        if not s.get("measured"):
            return f" nlist {v['nlist']} nprobe {s.get('nprobe', v['nprobe'])} (default, not measured)"
        rec = f", recall@100 {s['recall_at_100']:.3f}" if "recall_at_100" in s else ""
        return f" nlist {v['nlist']} nprobe {s['nprobe']} refine {s['refine']}x (measured{rec})"

    def codec(v: dict) -> str:
        if v["codec"] != "pq":
            return v["codec"]
        bits = v.get("nbits", 8)  # indexes of older versions: 8-bit codes, no "nbits"
        return f"pq {v['m']}x{bits}-bit" + (" fast-scan" if bits == 4 else "")

    t.add_row("stores", ", ".join(f"{k}: {v['ann']} {codec(v)}" + probe(k, v) for k, v in cb["stores"].items()))
    t.add_row("segments", str(info["segments"]) + ("  [yellow](many: `attrib compact` merges them)[/yellow]"
                                                   if info["segments"] > 16 else ""))
    src = m["build"].get("source") or {}
    t.add_row("source", escape(f"{src.get('kind')}: {src.get('path')}") + (
        f" (+{len(m.get('sources', [])) - 1} appended)" if len(m.get("sources", [])) > 1 else ""))
    t.add_row("versions", escape(", ".join(f"{k} {v}" for k, v in m["versions"].items())))
    fz = info.get("fusion") or {}
    t.add_row("fusion", escape(fz.get("note", "")) + (f"\n{escape(fz['learned'])}" if fz.get("learned") else ""))
    for w in fz.get("warnings", []):
        t.add_row("", f"[yellow]{escape(w)}[/yellow]")
    cal = info.get("calibration")
    if cal:
        test = cal.get("scores", {}).get("test", {}) if isinstance(cal.get("scores"), dict) else {}
        t.add_row("calibration", f"{'used' if cal.get('used') else 'not used'}; threshold "
                                 f"{fmt_number(cal.get('threshold'))}; held-out self-made queries: map@100 "
                                 f"{fmt_number(test.get('map@100'))}, false attribution "
                                 f"{fmt_number(test.get('false_attribution_rate'))}")
    c.print(t)
    s = Table(title="size on disk")
    for col in ("component", "bytes", "per record", "grows with"):
        s.add_column(col, justify="right" if col not in ("component", "grows with") else "left")
    for name, b in sorted(info["sizes"].items(), key=lambda kv: -kv[1]):
        s.add_row(name, _human(b), _human(info["disk_bytes_per_record"][name]), info["grows_with"].get(name, ""))
    s.add_row("[bold]total[/bold]", _human(info["total_bytes"]), _human(info["disk_bytes_per_record"]["total"]), "")
    c.print(s)
    ram = info["ram_bytes_per_record"]
    c.print(f"[dim]resident in RAM per record while querying (estimate): {ram['total']:.0f} B; the rest is "
            f"memory-mapped and read on demand[/dim]")


def calibration_line(w) -> str:
    """One line on where fusion weights came from (``attrib info``, ``attrib calibrate``)."""
    p = w.provenance
    return (f"{p.get('learned_by') or 'learned'} {p.get('created', '')}: {p.get('learned_on') or p.get('benchmark')}; "
            f"threshold {fmt_number(w.threshold)}")


def print_calibration(w, path) -> None:
    """The fit of a self-calibration: tune and held-out test by kind of self-made query."""
    c = stderr_console()
    p = w.provenance
    tables = p.get("by_kind", {})
    t = Table(title="self-calibration: map@100 (false-attribution rate at the threshold for held-out records), "
                    "tune | test; rrf for comparison")
    for col in ("kind", "queries", "fused", "rrf"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    kinds = list(dict.fromkeys([*tables.get("tune", {}), *tables.get("test", {})]))
    for kind in kinds:
        a, b = tables.get("tune", {}).get(kind, {}), tables.get("test", {}).get(kind, {})
        if "map@100" in a or "map@100" in b:
            fused = f"{fmt_number(a.get('map@100'))} | {fmt_number(b.get('map@100'))}"
            rrf = f"{fmt_number(a.get('rrf_map@100'))} | {fmt_number(b.get('rrf_map@100'))}"
        else:
            fused = f"{fmt_number(a.get('false_attribution_rate'))} | {fmt_number(b.get('false_attribution_rate'))}"
            rrf = "-"
        t.add_row(f"[bold]{escape(kind)}[/bold]" if kind == "all" else escape(kind),
                  f"{a.get('n', 0)} | {b.get('n', 0)}", fused, rrf)
    c.print(t)
    s = p.get("scores", {}).get("test", {})
    c.print(f"held-out test: map@100 {fmt_number(s.get('map@100'))} (rrf {fmt_number(s.get('rrf_map@100'))}), "
            f"recall@1 {fmt_number(s.get('recall@1'))} (rrf {fmt_number(s.get('rrf_recall@1'))}), "
            f"false attribution {fmt_number(s.get('false_attribution_rate'))} (target {p.get('target_far')})")
    secs = p.get("seconds", {})
    c.print(f"threshold {fmt_number(w.threshold)} ({escape(w.threshold_rule)}); {escape(p.get('learned_on', ''))}; "
            f"{secs.get('total', 0):.1f}s (encoding {secs.get('encode', 0):.1f}s, ranking {secs.get('rank', 0):.1f}s)")
    c.print(f"weights written to [bold]{escape(str(path))}[/bold]" if path else "[dim]dry run: nothing written[/dim]")


def _short(text: str | None, n: int = 60) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def _marked(caption: str | None, spans: list | None, n: int = 120) -> Text:
    """The caption (cut to ``n`` characters) with shared words in bold yellow and shared phrases underlined."""
    text = Text(_short(caption, n))
    for s, e, kind in spans or []:
        if int(e) <= len(text.plain):
            text.stylize("underline" if kind == "phrase" else "bold yellow", int(s), int(e))
    return text


def print_attribution(res) -> None:
    """An :class:`engine.Attribution` as a verdict line and a table of results with their evidence."""
    c = stderr_console()
    for w in res.warnings:
        if "UNTRAINED" in w:
            c.print(untrained_panel(w))
        else:
            c.print(f"[dim]{escape(w)}[/dim]")
    v = res.verdict
    style = "bold green" if v.likely_source else ("bold red" if v.likely_source is False else "bold")
    c.print(f"[{style}]{escape(v.label)}[/{style}]  [dim](fusion: {escape(res.fusion['note'])})[/dim]")
    if res.fusion.get("learned_by"):
        c.print(f"[dim]weights {escape(str(res.fusion.get('weights')))} learned by {escape(res.fusion['learned_by'])} "
                f"on {escape(str(res.fusion.get('learned_on')))}[/dim]")
    t = Table(title=f"attribution for {escape(str(res.query.get('image') or '(no image)'))}"
                    f" + prompt {escape(_short(repr(res.query.get('prompt') or ''), 50))}")
    t.add_column("#", justify="right")
    t.add_column("id", no_wrap=True, overflow="ellipsis", min_width=12, max_width=40)
    t.add_column("score", justify="right")
    with_share = any(r.share is not None for r in res.results)
    if with_share:
        t.add_column("share", justify="right")
    t.add_column("evidence", overflow="fold", min_width=20)  # one signal per line
    t.add_column("caption", overflow="fold", max_width=48)
    labels = [(f.name, f.label) for f in features()]
    for r in res.results:
        e = r.evidence
        mark = "[green]●[/green] " if r.above_threshold else ""
        ev = "\n".join(f"{label} {fmt_number(e[key])}" for key, label in labels if e.get(key) is not None)
        if r.carried_by is not None:
            ev += "\ncarried by " + (", ".join(r.carried_by) or "-")
        if r.caption_match_only:
            ev += "\nCAPTION MATCH ONLY"
        row = [str(r.rank), mark + escape(str(r.id)), fmt_number(r.score)]
        if with_share:
            row.append(f"{r.share:.0%}" if r.share is not None else "")
        cap = _marked(r.caption, (r.text or {}).get("spans"))
        dups = (r.text or {}).get("duplicates")
        if dups:
            cap.append(f"\n(caption shared by {dups} other record{'s' if dups != 1 else ''})", style="dim")
        row += [escape(ev) or "-", cap]
        t.add_row(*row)
    c.print(t)
    tm = res.timings_ms
    c.print("[dim]" + ", ".join(f"{k} {v:.0f} ms" for k, v in tm.items()) + "[/dim]")
