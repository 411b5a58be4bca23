#!/usr/bin/env python3
"""Writes the Grafana dashboards (charts/peervault/dashboards/*.json) from the panel lists below.

The JSON files are committed; `deploy/tests/test_dashboard_json.py` checks that they equal
this script's output, so edit here and run `python3 deploy/dashboards.py`. Every query uses the
`datasource` template variable and `$__rate_interval`; no `__inputs` (those only resolve on
manual import, and sidecar-provisioned dashboards would show "Datasource not found").
"""
import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "charts" / "peervault" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
R = "[$__rate_interval]"


def variables():
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
            },
            {
                "name": "job",
                "label": "Job",
                "type": "query",
                "datasource": DS,
                "query": {"query": "label_values(peervault_build_info, job)", "refId": "job"},
                "definition": "label_values(peervault_build_info, job)",
                "includeAll": True,
                "allValue": ".+",
                "multi": True,
                "current": {},
                "refresh": 2,
                "sort": 1,
                "hide": 0,
            },
            {
                "name": "instance",
                "label": "Instance",
                "type": "query",
                "datasource": DS,
                "query": {
                    "query": 'label_values(peervault_build_info{job=~"$job"}, instance)',
                    "refId": "instance",
                },
                "definition": 'label_values(peervault_build_info{job=~"$job"}, instance)',
                "includeAll": True,
                "allValue": ".+",
                "multi": True,
                "current": {},
                "refresh": 2,
                "sort": 1,
                "hide": 0,
            },
        ]
    }


class Board:
    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels = []
        self.y = 0
        self.x = 0
        self.row_h = 0

    def row(self, title):
        self.newline()
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def newline(self):
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def panel(self, title, targets, unit="short", kind="timeseries", w=12, h=8, description=""):
        if self.x + w > 24:
            self.newline()
        p = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "timeseries":
            p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True}}
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)

    def text(self, title, content, w=24, h=4):
        if self.x + w > 24:
            self.newline()
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "text",
                "title": title,
                "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
                "options": {"mode": "markdown", "content": content},
            }
        )
        self.x += w
        self.row_h = max(self.row_h, h)

    def json(self):
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["peervault"],
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-1h", "to": "now"},
            "timezone": "",
            "templating": variables(),
            "annotations": {"list": []},
            "links": [
                {"title": "PeerVault", "type": "dashboards", "tags": ["peervault"], "asDropdown": True}
            ],
            "panels": self.panels,
        }


def overview():
    b = Board("peervault-overview", "PeerVault / Overview", "Requests, errors, latency, throughput and storage of every PeerVault process.")
    b.row("Service")
    b.panel("Ready processes", [(f"sum by (job) (peervault_ready{{{SEL}}})", "{{job}}")], kind="stat", w=6, h=4)
    b.panel("Scrape targets up", [(f"sum by (job) (up{{{SEL}}})", "{{job}}")], kind="stat", w=6, h=4)
    b.panel("Versions", [(f"count by (version, role) (peervault_build_info{{{SEL}}})", "{{role}} {{version}}")], kind="stat", w=6, h=4)
    b.panel("Error ratio (non-OK / all calls)",
            [(f'sum(rate(grpc_server_handled_total{{{SEL}, grpc_code!="OK"}}{R})) / sum(rate(grpc_server_handled_total{{{SEL}}}{R}))', "errors")],
            unit="percentunit", kind="stat", w=6, h=4)
    b.row("Requests")
    b.panel("Requests by method", [(f"sum by (grpc_service, grpc_method) (rate(grpc_server_started_total{{{SEL}}}{R}))", "{{grpc_service}}/{{grpc_method}}")], unit="reqps")
    b.panel("Errors by method and code", [(f'sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total{{{SEL}, grpc_code!="OK"}}{R}))', "{{grpc_method}} {{grpc_code}}")], unit="reqps")
    b.panel("Latency p99 by method", [(f"histogram_quantile(0.99, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{{{SEL}}}{R})))", "{{grpc_method}}")], unit="s")
    b.panel("Latency p50 by method", [(f"histogram_quantile(0.5, sum by (le, grpc_method) (rate(grpc_server_handling_seconds_bucket{{{SEL}}}{R})))", "{{grpc_method}}")], unit="s")
    b.panel("Stream messages", [
        (f"sum by (grpc_method) (rate(grpc_server_msg_received_total{{{SEL}}}{R}))", "received {{grpc_method}}"),
        (f"sum by (grpc_method) (rate(grpc_server_msg_sent_total{{{SEL}}}{R}))", "sent {{grpc_method}}"),
    ], unit="short")
    b.panel("Connections", [(f"sum by (instance) (peervault_grpc_connections{{{SEL}}})", "{{instance}}"),
                            (f"sum by (instance) (rate(peervault_grpc_connections_total{{{SEL}}}{R}))", "accepted/s {{instance}}")])
    b.row("Data")
    b.panel("Throughput", [
        (f"sum by (instance) (rate(peervault_blob_bytes_written_total{{{SEL}}}{R}))", "written {{instance}}"),
        (f"sum by (instance) (rate(peervault_blob_bytes_read_total{{{SEL}}}{R}))", "read {{instance}}"),
    ], unit="Bps")
    b.panel("Upload duration p99 (to durable commit)", [(f"histogram_quantile(0.99, sum by (le) (rate(peervault_blob_upload_duration_seconds_bucket{{{SEL}}}{R})))", "p99")], unit="s")
    b.panel("Storage used and quota", [
        (f"sum by (instance) (peervault_blob_storage_used_bytes{{{SEL}}})", "used {{instance}}"),
        (f"sum by (instance) (peervault_blob_logical_bytes{{{SEL}}})", "logical {{instance}}"),
        (f"sum by (instance) (peervault_blob_storage_quota_bytes{{{SEL}}})", "quota {{instance}} (0: none)"),
    ], unit="bytes")
    b.panel("Objects", [
        (f"sum by (instance) (peervault_blob_files{{{SEL}}})", "files {{instance}}"),
        (f"sum by (instance) (peervault_blob_blobs{{{SEL}}})", "blobs {{instance}}"),
        (f"sum by (instance) (peervault_blob_chunks{{{SEL}}})", "chunks {{instance}}"),
    ])
    b.panel("Deduplication ratio", [(f"max by (instance) (peervault_blob_dedup_ratio{{{SEL}}})", "{{instance}}")], w=8)
    b.panel("Uploads in progress", [(f"sum by (instance) (peervault_blob_uploads_in_progress{{{SEL}}})", "{{instance}}")], w=8)
    b.panel("Index commit p99 (with fsync)", [(f"histogram_quantile(0.99, sum by (le) (rate(peervault_blob_commit_seconds_bucket{{{SEL}}}{R})))", "p99")], unit="s", w=8)
    b.panel("Garbage collection", [
        (f"sum(rate(peervault_blob_gc_bytes_freed_total{{{SEL}}}{R}))", "bytes freed/s"),
        (f"sum(rate(peervault_blob_gc_chunks_collected_total{{{SEL}}}{R}))", "chunks/s"),
        (f"sum(rate(peervault_blob_uploads_expired_total{{{SEL}}}{R}))", "expired uploads/s"),
    ], w=8)
    b.panel("Integrity failures and full-volume refusals", [
        (f"sum by (instance) (increase(peervault_blob_integrity_failures_total{{{SEL}}}{R}))", "hash mismatch {{instance}}"),
        (f"sum by (instance) (increase(peervault_blob_volume_full_total{{{SEL}}}{R}))", "volume full {{instance}}"),
    ], w=8)
    b.panel("Segments and compaction", [
        (f"sum by (instance) (peervault_blob_segments{{{SEL}}})", "segments {{instance}}"),
        (f"sum by (instance) (peervault_blob_segment_dead_bytes{{{SEL}}})", "dead bytes {{instance}}"),
        (f"sum(rate(peervault_blob_compaction_bytes_total{{{SEL}}}{R}))", "compacted bytes/s"),
        (f"sum(rate(peervault_blob_compaction_runs_total{{{SEL}}}{R}))", "compaction passes/s"),
        (f"sum(rate(peervault_blob_segments_freed_total{{{SEL}}}{R}))", "segments freed/s"),
    ], w=8)
    b.panel("Commit batch size p50", [(f"histogram_quantile(0.5, sum by (le) (rate(peervault_blob_commit_batch_size_bucket{{{SEL}}}{R})))", "p50")], w=8)
    b.panel("Index journal (small puts)", [
        (f"sum by (outcome) (rate(peervault_blob_journal_appends_total{{{SEL}}}{R}))", "appends {{outcome}}/s"),
        (f"sum(rate(peervault_blob_journal_bytes_total{{{SEL}}}{R}))", "bytes/s"),
        (f"sum by (instance) (increase(peervault_blob_journal_replayed_puts_total{{{SEL}}}{R}))", "replayed after a crash {{instance}}"),
    ], w=8)
    b.row("Security and process")
    b.panel("Refused calls and handshakes", [
        (f"sum by (reason) (rate(peervault_auth_failures_total{{{SEL}}}{R}))", "auth {{reason}}"),
        (f"sum by (reason) (rate(peervault_tls_handshake_failures_total{{{SEL}}}{R}))", "tls {{reason}}"),
    ], unit="reqps", w=8)
    b.panel("Memory (RSS)", [(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")], unit="bytes", w=8)
    b.panel("CPU", [(f"rate(process_cpu_seconds_total{{{SEL}}}{R})", "{{instance}}")], unit="percentunit", w=8)
    b.panel("Uptime", [(f"time() - max by (instance) (peervault_start_time_seconds{{{SEL}}})", "{{instance}}")], unit="s", kind="stat", w=24, h=4)
    return b


def peers():
    b = Board("peervault-peers", "PeerVault / Peers", "Membership: which blob pods are up, how fast they answer health checks, and how the view changes.")
    b.row("Health")
    b.panel("Peers up", [(f"sum(peervault_peer_up{{{SEL}}})", "up"), (f"max(peervault_peer_membership_size{{{SEL}}})", "members")], kind="stat", w=8, h=4)
    b.panel("Down peers", [(f"count(peervault_peer_up{{{SEL}}} == 0) or (sum(peervault_peer_up{{{SEL}}}) * 0)", "down")], kind="stat", w=8, h=4,
            description="Members whose health is down (0 when all are up).")
    b.panel("Open membership watchers", [(f"sum(peervault_peer_watchers{{{SEL}}})", "watchers")], kind="stat", w=8, h=4)
    b.panel("Up / down by peer", [(f"max by (peer) (peervault_peer_up{{{SEL}}})", "{{peer}}")], kind="state-timeline", w=24)
    b.panel("Health check latency p99", [(f"histogram_quantile(0.99, sum by (le) (rate(peervault_peer_probe_duration_seconds_bucket{{{SEL}}}{R})))", "p99")], unit="s")
    b.panel("Health checks by result", [(f"sum by (result) (rate(peervault_peer_probes_total{{{SEL}}}{R}))", "{{result}}")], unit="reqps")
    b.row("Membership")
    b.panel("Health transitions", [(f"sum by (state) (increase(peervault_peer_health_transitions_total{{{SEL}}}{R}))", "{{state}}")])
    b.panel("Membership view version changes", [(f"changes(peervault_peer_membership_version{{{SEL}}}{R})", "peer {{instance}}"),
                                                (f"sum by (kind) (increase(peervault_membership_updates_total{{{SEL}}}{R}))", "blob applied {{kind}}")])
    b.panel("Discovered endpoints", [(f"sum by (provider) (peervault_peer_discovered{{{SEL}}})", "{{provider}}")], w=8)
    b.panel("Blob pods' view (members / ready)", [
        (f"sum by (instance) (peervault_membership_view_size{{{SEL}}})", "members {{instance}}"),
        (f"sum by (instance) (peervault_membership_view_ready{{{SEL}}})", "ready {{instance}}"),
    ], w=8)
    b.panel("Blob pods' membership stream", [
        (f"min by (instance) (peervault_membership_connected{{{SEL}}})", "connected {{instance}}"),
        (f"sum by (instance) (increase(peervault_membership_reconnects_total{{{SEL}}}{R}))", "reconnects {{instance}}"),
    ], w=8)
    return b


def replication():
    b = Board("peervault-replication", "PeerVault / Replication", "Replicas still to be written, data moved between blob pods, repairs, anti-entropy and the placement inputs.")
    b.row("Backlog")
    b.panel("Hand-off queue (replicas still to be written)", [(f"sum by (instance) (peervault_replication_handoff_queue_depth{{{SEL}}})", "{{instance}}")], w=8)
    b.panel("Under-replicated files", [(f"sum by (instance) (peervault_replication_under_replicated{{{SEL}}})", "{{instance}}")], w=8)
    b.panel("Coordinated writes by outcome", [(f"sum by (result) (rate(peervault_replication_writes_total{{{SEL}}}{R}))", "{{result}}")], unit="reqps", w=8,
            description="unavailable: no majority; unknown: a timeout after some owners committed.")
    b.row("Data moved and repairs")
    b.panel("Bytes sent to other pods by reason", [(f"sum by (reason) (rate(peervault_replication_bytes_sent_total{{{SEL}}}{R}))", "{{reason}}"),
                                                  (f"sum(rate(peervault_replication_bytes_received_total{{{SEL}}}{R}))", "received")], unit="Bps")
    b.panel("Repairs", [
        (f"sum(rate(peervault_replication_read_repairs_total{{{SEL}}}{R}))", "read repairs/s"),
        (f"sum(rate(peervault_replication_failovers_total{{{SEL}}}{R}))", "chunk failovers/s"),
        (f"sum(rate(peervault_replication_scrub_repaired_total{{{SEL}}}{R}))", "scrub repairs/s"),
        (f"sum(rate(peervault_replication_degraded_reads_total{{{SEL}}}{R}))", "degraded reads/s"),
        (f"sum(rate(peervault_replication_tombstones_collected_total{{{SEL}}}{R}))", "tombstones collected/s"),
    ])
    b.panel("Coalesced record calls and the items they carry", [
        (f"sum by (call) (rate(peervault_replication_batch_size_count{{{SEL}}}{R}))", "{{call}} calls/s"),
        (f"sum by (call) (rate(peervault_replication_batch_size_sum{{{SEL}}}{R}))", "{{call}} items/s"),
    ], w=8, description="Concurrent record reads, pendings and commits to one pod share a call: items/s over calls/s is the batch size; the higher, the fewer round trips and fsyncs per write.")
    b.panel("Replica repairs and time spent repairing", [
        (f"sum(rate(peervault_replication_repair_duration_seconds_count{{{SEL}}}{R}))", "repairs/s"),
        (f"sum(rate(peervault_replication_repair_duration_seconds_sum{{{SEL}}}{R}))", "repair seconds/s"),
    ], w=8)
    b.panel("Resumed uploads relayed to the pod holding them", [(f"sum by (result) (rate(peervault_replication_uploads_forwarded_total{{{SEL}}}{R}))", "{{result}}")], w=8,
            description="A Graviton upload resumed through another pod is relayed to the pod that holds it; errors: the holder refused, failed or was down.")
    b.panel("Anti-entropy digest rounds by result", [(f"sum by (result) (rate(peervault_replication_digest_rounds_total{{{SEL}}}{R}))", "{{result}}")], w=8)
    b.panel("Clock readings refused (too far ahead)", [(f"sum by (instance) (increase(peervault_replication_clock_refusals_total{{{SEL}}}{R}))", "{{instance}}")], w=8)
    b.row("Placement")
    b.panel("Members and replication factor in force", [
        (f"max by (instance) (peervault_replication_members{{{SEL}}})", "members {{instance}}"),
        (f"max by (instance) (peervault_replication_factor{{{SEL}}})", "factor {{instance}}"),
    ], w=8)
    b.panel("Ready members in each blob pod's view (placement input)", [
        (f"min by (instance) (peervault_membership_view_ready{{{SEL}}})", "ready {{instance}}"),
        (f"max by (instance) (peervault_membership_view_size{{{SEL}}})", "members {{instance}}"),
    ], w=8)
    b.panel("View version skew between blob pods", [(f"max(peervault_membership_view_version{{{SEL}}}) - min(peervault_membership_view_version{{{SEL}}})", "skew")], w=8,
            description="Non-zero for long: some blob pods place data by an older view.")
    b.panel("Integrity failures (repair needed)", [(f"sum by (instance) (increase(peervault_blob_integrity_failures_total{{{SEL}}}{R}))", "{{instance}}")])
    b.panel("Stored bytes per blob pod (balance)", [(f"sum by (instance) (peervault_blob_storage_used_bytes{{{SEL}}})", "{{instance}}")], unit="bytes")
    return b


def events():
    b = Board("peervault-events", "PeerVault / Events", "Event fan-out: what is published, delivered and dropped, subscriber lag, WebSocket connections.")
    b.row("Flow")
    b.panel("Published by topic", [(f"sum by (topic) (rate(peervault_events_published_total{{{SEL}}}{R}))", "{{topic}}")], unit="short")
    b.panel("Delivered by topic and transport", [(f"sum by (topic, transport) (rate(peervault_events_delivered_total{{{SEL}}}{R}))", "{{topic}} {{transport}}")])
    b.panel("Dropped for lagging subscribers", [(f"sum by (transport) (increase(peervault_events_dropped_total{{{SEL}}}{R}))", "{{transport}}")])
    b.panel("Lag notices", [(f"sum by (transport) (increase(peervault_events_lag_notices_total{{{SEL}}}{R}))", "{{transport}}")])
    b.panel("Delivery latency p99 (arrival to hand-off)", [(f"histogram_quantile(0.99, sum by (le, transport) (rate(peervault_events_delivery_latency_seconds_bucket{{{SEL}}}{R})))", "{{transport}}")], unit="s")
    b.panel("Subscribers", [(f"sum by (transport) (peervault_events_subscribers{{{SEL}}})", "{{transport}}")])
    b.panel("Replay buffer", [(f"sum by (instance) (peervault_events_buffered{{{SEL}}})", "buffered {{instance}}")], w=8)
    b.panel("Last sequence per events pod", [(f"max by (instance) (peervault_events_last_sequence{{{SEL}}})", "{{instance}}")], w=8)
    b.panel("Duplicates and replays", [
        (f"sum(rate(peervault_events_duplicates_total{{{SEL}}}{R}))", "duplicates/s"),
        (f"sum(rate(peervault_events_replayed_total{{{SEL}}}{R}))", "replayed/s"),
    ], w=8)
    b.row("Publishers (blob, peer)")
    b.panel("Handed to events pods", [(f"sum by (job, topic) (rate(peervault_events_client_published_total{{{SEL}}}{R}))", "{{job}} {{topic}}")], w=8)
    b.panel("Publisher queue depth", [(f"sum by (instance) (peervault_events_client_queue_depth{{{SEL}}})", "{{instance}}")], w=8)
    b.panel("Events pods published to", [(f"min by (instance) (peervault_events_client_endpoints{{{SEL}}})", "{{instance}}")], w=8)
    b.row("WebSocket")
    b.panel("Connections", [(f"sum by (instance) (peervault_events_ws_connections{{{SEL}}})", "open {{instance}}"),
                            (f"sum by (instance) (rate(peervault_events_ws_connections_total{{{SEL}}}{R}))", "opened/s {{instance}}")], w=8)
    b.panel("Messages received by type", [(f"sum by (type) (rate(peervault_events_ws_messages_received_total{{{SEL}}}{R}))", "{{type}}")], w=8)
    b.panel("Errors sent by code", [(f"sum by (code) (increase(peervault_events_ws_errors_total{{{SEL}}}{R}))", "{{code}}")], w=8)
    b.panel("Alerts raised", [(f"sum by (type, level) (increase(peervault_events_alerts_total{{{SEL}}}{R}))", "{{type}} {{level}}")], w=24)
    return b


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn in [("overview", overview), ("peers", peers), ("replication", replication), ("events", events)]:
        (OUT / f"{name}.json").write_text(json.dumps(fn().json(), indent=2) + "\n")


if __name__ == "__main__":
    main()
