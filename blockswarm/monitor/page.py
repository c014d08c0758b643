"""The HTML page: rendered here from the latest snapshot, so it reads fine without JavaScript.

The page's script polls `/api/v1/state`; when a newer crawl is there it fetches the page again and swaps
its `<main>`, so this module stays the only renderer and there is no frontend build step.
"""

from __future__ import annotations

from html import escape

from blockswarm.dht import ServerState

from .state import HistoryPoint, ModelState, PeerRecord, Snapshot

CHART_WIDTH, CHART_HEIGHT = 320, 90

STYLE = """
:root { --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --muted: #656d76; --line: #d0d7de; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1f2328;
  background: #f6f8fa; }
header, main, footer { max-width: 1440px; margin: 0 auto; padding: 12px 16px; }
header h1 { font-size: 1.35rem; margin: 0 0 4px; }
.muted { color: var(--muted); }
.error { background: #ffebe9; border: 1px solid var(--bad); padding: 8px 12px; border-radius: 6px; }
section.model { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
  margin-bottom: 16px; }
section.model h2 { font-size: 1.1rem; margin: 0; overflow-wrap: anywhere; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: .8rem; font-weight: 600;
  color: #fff; vertical-align: middle; }
.healthy, .online { background: var(--ok); }
.broken, .offline, .unreachable { background: var(--bad); }
.joining, .draining { background: var(--warn); }
.relay { background: #6f42c1; }
.training { background: #0969da; }
.facts { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 6px 0 10px; }
.summary { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.coverage { flex: 1 1 320px; }
.cells { display: grid; grid-template-columns: repeat(auto-fill, minmax(22px, 1fr)); gap: 2px; }
.cell { height: 24px; border-radius: 3px; font-size: .65rem; color: #fff; text-align: center; line-height: 24px; }
.legend { font-size: .8rem; margin-top: 4px; }
.chart svg { background: #fafbfc; border: 1px solid var(--line); border-radius: 4px; max-width: 100%; height: auto; }
.chart .blocks { stroke: #0969da; } .chart .throughput { stroke: #bc4c00; stroke-dasharray: 5 3; }
.key-blocks { color: #0969da; } .key-throughput { color: #bc4c00; }
.scroll { overflow-x: auto; margin-top: 12px; }
table { border-collapse: collapse; font-size: .85rem; white-space: nowrap; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left; }
th { background: #f6f8fa; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.span { position: relative; width: 120px; height: 12px; background: #eaeef2; border-radius: 2px; }
.span div { position: absolute; top: 0; bottom: 0; background: #0969da; border-radius: 2px; }
code { font-size: .85em; }
@media (max-width: 600px) { header, main, footer { padding: 8px; } section.model { padding: 10px; } }
"""

SCRIPT = """
(() => {
  const period = Number(document.body.dataset.period);
  const status = document.getElementById("status");
  const takenAt = () => Number(document.querySelector("main").dataset.takenAt || 0);
  function tick() {
    const at = takenAt();
    status.textContent = at ? `Last crawl ${Math.round(Date.now() / 1000 - at)} s ago.` : "First crawl running…";
  }
  async function refresh() {
    try {
      const state = await (await fetch("api/v1/state")).json();
      const latest = state.snapshot ? state.snapshot.taken_at : 0;
      if (latest !== takenAt()) {
        const page = new DOMParser().parseFromString(await (await fetch("./")).text(), "text/html");
        document.querySelector("main").replaceWith(page.querySelector("main"));
      }
      tick();
    } catch (e) {
      status.textContent = "cannot reach the monitor, retrying…";
    }
  }
  tick();
  setInterval(tick, 1000);
  setInterval(refresh, Math.min(period, 10) * 1000);
})();
"""


def render_page(snapshot: Snapshot | None, history: dict[str, list[HistoryPoint]], period: float) -> str:
    if snapshot is None:
        body = '<p class="muted">The first crawl of the swarm is still running; this page refreshes itself.</p>'
        taken_at = ""
    else:
        error = f'<p class="error">The last crawl failed: {escape(snapshot.error)}</p>' if snapshot.error else ""
        models = "".join(_model(model, history.get(model.name, [])) for model in snapshot.models)
        if not snapshot.models and not snapshot.error:
            models = '<p class="muted">No model is announced on this swarm yet.</p>'
        body = (
            f'<p class="muted">{len(snapshot.models)} model(s); the crawl took {snapshot.crawl_seconds:.2f} s.</p>'
            + error
            + models
        )
        taken_at = repr(snapshot.taken_at)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>blockswarm monitor</title><style>{STYLE}</style></head>
<body data-period="{period:g}">
<header><h1>blockswarm swarm monitor</h1>
<div class="muted">Crawls every {period:g} s. <span id="status"></span></div></header>
<main data-taken-at="{taken_at}">{body}</main>
<footer class="muted">JSON: <a href="api/v1/state">/api/v1/state</a> · Prometheus: <a href="metrics">/metrics</a>
</footer>
<script>{SCRIPT}</script>
</body></html>
"""


def _model(model: ModelState, points: list[HistoryPoint]) -> str:
    health = "healthy" if model.healthy else "broken"
    return f"""<section class="model" data-model="{escape(model.name)}">
<h2>{escape(model.name)} <span class="badge {health}">{health}</span></h2>
<div class="facts muted">
<span>{model.covered_blocks} / {model.num_blocks} blocks covered</span>
<span>{len(model.peers)} peer(s){_training_summary(model)}</span>
<span>throughput per block: min {_number(model.min_throughput)} · avg {_number(model.avg_throughput)}</span>
<span>{escape(model.family)} · config <code>{escape(model.config_hash[:8])}</code>
· weights <code>{escape(model.weights_hash[:8])}</code></span>
</div>
<div class="summary">
<div class="coverage"><div class="cells">{_cells(model)}</div>
<div class="legend muted">One cell per block; darker green = more throughput covers it; red = nobody serves it.</div>
</div>
<div class="chart">{_chart(model, points)}</div>
</div>
<div class="scroll">{_peers_table(model)}</div>
</section>
"""


def _cells(model: ModelState) -> str:
    most = max((block.throughput for block in model.blocks), default=0.0) or 1.0
    cells = []
    for block in model.blocks:
        shade = 62 - 34 * block.throughput / most
        colour = f"hsl(140, 60%, {shade:.0f}%)" if block.peers else "#cf222e"
        title = f"block {block.index}: {block.peers} serving peer(s), throughput {_number(block.throughput)}"
        cells.append(
            f'<div class="cell" data-block="{block.index}" data-peers="{block.peers}" style="background: {colour}"'
            f' title="{title}">{block.index}</div>'
        )
    return "".join(cells)


def _chart(model: ModelState, points: list[HistoryPoint]) -> str:
    """Covered blocks and total throughput since the oldest kept crawl (at most an hour), each from 0 to its max."""
    since = min((point.taken_at for point in points), default=0.0)
    window = max(max((point.taken_at for point in points), default=0.0) - since, 1.0)
    top = max((point.total_throughput for point in points), default=0.0) or 1.0

    def polyline(values: list[float], scale: float, cls: str) -> str:
        xy = [
            f"{CHART_WIDTH * (point.taken_at - since) / window:.1f},{CHART_HEIGHT * (1 - value / scale):.1f}"
            for point, value in zip(points, values)
        ]
        return f'<polyline class="{cls}" fill="none" stroke-width="2" points="{" ".join(xy)}"/>'

    baseline = f'<line x1="0" y1="{CHART_HEIGHT}" x2="{CHART_WIDTH}" y2="{CHART_HEIGHT}" stroke="#d0d7de"/>'
    lines = polyline([p.covered_blocks for p in points], model.num_blocks, "blocks") + polyline(
        [p.total_throughput for p in points], top, "throughput"
    )
    return (
        f'<svg viewBox="-2 -4 {CHART_WIDTH + 4} {CHART_HEIGHT + 8}" width="{CHART_WIDTH}" height="{CHART_HEIGHT}"'
        f' role="img" aria-label="covered blocks and total throughput over time">{baseline}{lines}</svg>'
        f'<div class="legend muted">last {_duration(window)}: <span class="key-blocks">covered blocks'
        f" (0–{model.num_blocks})</span> · "
        f'<span class="key-throughput">total throughput (0–{_number(top)})</span></div>'
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _training_summary(model: ModelState) -> str:
    training = sum(peer.training for peer in model.peers)
    return f", {training} training" if training else ""


def _number(value: float) -> str:
    """Short and readable: 25700 -> 25.7k."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}"


PEER_COLUMNS = (
    "Peer",
    "Name",
    "State",
    "Reachable",
    "Connection",
    "Span",
    "Training",
    "Throughput",
    "Inference / forward rps",
    "Dtype / quant",
    "Memory / block",
    "Codecs",
    "Version",
    "Free cache tokens",
    "Sessions / queued",
    "Pings",
)


def _peers_table(model: ModelState) -> str:
    head = "".join(f"<th>{name}</th>" for name in PEER_COLUMNS)
    rows = "".join(_peer_row(peer, model.num_blocks) for peer in model.peers)
    return f'<table class="peers"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _rps(value: float | None) -> str:
    return "–" if value is None else _number(value)


def _peer_row(peer: PeerRecord, num_blocks: int) -> str:
    left, width = 100 * peer.start / num_blocks, 100 * (peer.end - peer.start) / num_blocks
    span = (
        f'<div class="span" title="blocks {peer.start}:{peer.end}">'
        f'<div style="left: {left:.2f}%; width: {width:.2f}%"></div></div>'
    )
    if peer.state != ServerState.ONLINE or peer.reachable is None:
        reachable = '<span class="muted">not checked</span>'
    elif peer.reachable:
        reachable = f'<span class="badge online">yes</span> {peer.rtt_ms:.0f} ms'
    else:
        reachable = f'<span class="badge unreachable" title="{escape(peer.error or "")}">no</span>'
    pings = "–"
    if peer.next_pings:
        listing = ", ".join(f"…{other[-6:]}: {1000 * rtt:.0f} ms" for other, rtt in sorted(peer.next_pings.items()))
        fastest = 1000 * min(peer.next_pings.values())
        pings = f'<span title="{escape(listing)}">{len(peer.next_pings)}, min {fastest:.0f} ms</span>'
    cells = [
        _td(f'<code title="{peer.peer_id}">{escape(peer.short_id)}</code>'),
        _td(escape(peer.public_name or "–")),
        _td(f'<span class="badge {peer.state.value}">{peer.state.value}</span>{_lie_badge(peer.lie_reports)}'),
        _td(reachable),
        _td(_connection(peer.using_relay)),
        _td(f'{span}<span class="muted">{peer.start}:{peer.end}</span>'),
        _td(_training(peer)),
        _td(_number(peer.throughput), numeric=True),
        _td(" / ".join(_rps(rps) for rps in (peer.inference_rps, peer.forward_rps)), numeric=True),
        _td(f"{escape(peer.dtype)} / {escape(peer.quant)}"),
        _td(_bytes(peer.memory_per_block), numeric=True),
        _td(escape(", ".join(peer.codecs))),
        _td(escape(peer.version or "–")),
        _td(str(peer.cache_tokens_left), numeric=True),
        _td(f"{peer.active_sessions} / {peer.queued_requests}", numeric=True),
        _td(pings),
    ]
    return f'<tr data-peer-id="{peer.peer_id}" data-state="{peer.state.value}">{"".join(cells)}</tr>'


def _bytes(count: int | None) -> str:
    """1536 -> "1.5 KiB"."""
    if count is None:
        return "–"
    power = 0
    while count >= 1024 ** (power + 1) and power < 3:
        power += 1
    return f"{count / 1024**power:.1f} {('B', 'KiB', 'MiB', 'GiB')[power]}"


def _training(peer: PeerRecord) -> str:
    if not peer.training:
        return '<span class="muted">frozen</span>'
    step = "step ?" if peer.training_step is None else f"step {peer.training_step}"
    return f'<span class="badge training">stage {peer.start}:{peer.end}</span> {step}'


def _connection(using_relay: bool) -> str:
    if not using_relay:
        return '<span class="muted">direct</span>'
    return '<span class="badge relay" title="behind NAT: clients reach it through a circuit relay">relay</span>'


def _lie_badge(reporters: int) -> str:
    if not reporters:
        return ""
    title = f"{reporters} client(s) caught this peer returning wrong outputs in spot checks (claims, not proof)"
    return f' <span class="badge unreachable" title="{title}">reported ×{reporters}</span>'


def _td(content: str, numeric: bool = False) -> str:
    return f'<td class="num">{content}</td>' if numeric else f"<td>{content}</td>"
