"""MLflow runs → one tidy frame: a row per trial × level × stage, settings and metrics as columns.

The rows come from each run's ``results.csv`` artifact, never from metric histories. What
costs time on a sweep of thousands of runs, and what is done instead (bench/aggregate.py):

* ``search_runs`` turns every param, tag and latest metric of every run into Python objects;
  on a SQLite store the few run fields needed are read with three SQL queries instead (the
  client is still used when that fails, and for any other store);
* ``download_artifacts`` asks the store twice per run and copies the file; an artifact under
  a local path (``file://`` or a plain path) is read in place, remote ones (an
  ``mlflow server``'s ``mlflow-artifacts:/``, http, cloud) are downloaded by a thread pool;
* ``read_csv`` and ``assign`` per run: files with the same header are parsed as one CSV and
  the settings columns are built once per group of alike runs, then one ``concat``.

The frame is exactly the one the plain per-run loop builds (same columns, order, dtypes and
values; tests/test_export.py compares them).
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote, urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd

from jobs.config import SETTINGS
from jobs.retrying import RESULTS_ARTIFACT, retry
from runner.store import find_experiment_id, require_store, resolve_uri, store_errors

ID_COLUMNS = ["sweep", "trial_id", "run_id", "run_name", "status", "error", "level", "stage"]
DOWNLOAD_THREADS = 8
_PLACEHOLDER = {"level": None, "stage": None}


def _typed(key: str, text: str) -> Any:
    """Turn a logged param string back into its setting's type."""
    info = SETTINGS.get(key)
    if info is None or info.type is str:
        return text
    if info.type is bool:
        return text == "True"
    try:
        return info.type(text)
    except ValueError:  # canonical placeholders such as prune.method "none" on int settings
        return text


@dataclass
class _Run:
    run_id: str
    status: str
    artifact_uri: str
    tags: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)


def _best(runs: Iterable[_Run]) -> dict[str, _Run]:
    """Per trial, the run ``runner.store.trial_runs`` picks (runs given in start-time order)."""
    best: dict[str, _Run] = {}
    for run in runs:
        tid = run.tags.get("trial_id")
        if tid and (tid not in best or best[tid].status != "FINISHED"):
            best[tid] = run
    return best


def _sqlite_path(uri: str) -> str | None:
    if not uri.startswith("sqlite:///") or "?" in uri:
        return None
    path = uri[len("sqlite:///"):]
    return path if path and Path(path).is_file() else None


def _runs_sql(path: str, experiment: str) -> tuple[str, dict[str, _Run]] | None:
    """(experiment id, chosen run per trial) straight from a SQLite store; None if its schema is unexpected."""
    try:
        db = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return None
    try:
        found = db.execute("SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)).fetchone()
        if found is None:
            return None  # the client's lookup says so, or finds what this query missed
        exp_id = found[0]
        # The order search_runs(order_by start_time ASC) returns: nulls last, run id breaks ties.
        rows = db.execute("SELECT run_uuid, status, artifact_uri FROM runs WHERE experiment_id = ? AND "
                          "lifecycle_stage = 'active' ORDER BY start_time IS NULL, start_time, run_uuid",
                          (exp_id,)).fetchall()
        runs = {rid: _Run(rid, status, uri or "", {}) for rid, status, uri in rows}
        active = "SELECT run_uuid FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active'"
        for rid, key, value in db.execute(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({active}) "
                                          "AND key IN ('trial_id', 'mlflow.runName', 'error')", (exp_id,)):
            runs[rid].tags[key] = value
        best = _best(runs.values())
        chosen = {run.run_id: run for run in best.values()}
        try:  # one JSON object per run: parsed in C, not one Python step per param
            for rid, blob in db.execute(f"SELECT run_uuid, json_group_object(key, value) FROM params "
                                        f"WHERE run_uuid IN ({active}) GROUP BY run_uuid", (exp_id,)):
                if rid in chosen:
                    chosen[rid].params = json.loads(blob)
        except sqlite3.OperationalError:  # SQLite built without JSON functions
            for rid, key, value in db.execute(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({active})",
                                              (exp_id,)):
                if rid in chosen:
                    chosen[rid].params[key] = value
        return str(exp_id), best
    except (sqlite3.Error, KeyError):  # not the schema we know: let MLflow itself read it
        return None
    finally:
        db.close()


def _runs_client(client, exp_id: str) -> dict[str, _Run]:
    """The chosen run per trial through ``search_runs`` (any store), in pages of MLflow's maximum."""
    runs, token = [], None
    while True:
        page = retry(client.search_runs, [exp_id], max_results=50_000, page_token=token,
                     order_by=["attributes.start_time ASC"])
        runs += [_Run(r.info.run_id, r.info.status, r.info.artifact_uri or "", dict(r.data.tags),
                      dict(r.data.params)) for r in page]
        token = page.token
        if not token:
            return _best(runs)


def _local_dir(artifact_uri: str) -> str | None:
    """The run's artifact directory if it is a path on this machine, else None."""
    if artifact_uri.startswith("/"):
        return artifact_uri
    if artifact_uri.startswith("file:///"):  # the usual case, without parsing each URI
        return url2pathname(artifact_uri[len("file://"):])
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return url2pathname(parsed.path)
    return None


def _download(client, run_id: str) -> bytes | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = retry(client.download_artifacts, run_id, RESULTS_ARTIFACT, tmp)
        except Exception:  # a run that died before writing its table
            return None
        return Path(path).read_bytes()


def _tables(uri: str, runs: list[_Run], local: bool) -> list[bytes | None]:
    """Each run's results.csv as bytes (None when it has none)."""
    out: list[bytes | None] = [None] * len(runs)
    remote = []
    for i, run in enumerate(runs):
        folder = _local_dir(run.artifact_uri) if local else None
        if folder is None:
            remote.append(i)
            continue
        try:
            with open(os.path.join(folder, RESULTS_ARTIFACT), "rb") as f:
                out[i] = f.read()
        except FileNotFoundError:
            if not os.path.isdir(folder):  # a server's artifact path that is not mounted here
                remote.append(i)
    if remote:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        with ThreadPoolExecutor(min(DOWNLOAD_THREADS, len(remote))) as pool:
            for i, blob in zip(remote, pool.map(lambda i: _download(client, runs[i].run_id), remote)):
                out[i] = blob
    return out


def _split(blob: bytes | None) -> tuple[bytes, bytes] | None:
    """(header line, body) of a CSV, or None when it has no data rows."""
    if not blob:
        return None
    cut = blob.find(b"\n")
    if cut < 0 or not blob[cut + 1:].strip():
        return None
    body = blob[cut + 1:]
    return blob[:cut + 1], body if body.endswith(b"\n") else body + b"\n"


def _simple(body: bytes) -> bool:
    """One data row per line: then rows can be counted, and files parsed together."""
    return b'"' not in body and b"\r" not in body and b"\n\n" not in body


def _read_group(header: bytes, bodies: list[bytes]) -> list[pd.DataFrame] | pd.DataFrame:
    """Parse the tables of one header as one CSV, or each alone when one parse could type columns differently."""
    if all(_simple(b) for b in bodies):
        counts = [b.count(b"\n") for b in bodies]
        frame = pd.read_csv(io.BytesIO(header + b"".join(bodies)))
        # A text column holding number-like values or gaps would have been typed per file.
        texts = [c for c in frame.columns if frame[c].dtype.kind not in "biufcmM"]
        if len(frame) == sum(counts) and all(
                frame[c].notna().all() and not pd.to_numeric(pd.Series(frame[c].unique()), errors="coerce").notna().any()
                for c in texts):
            return frame
    return [pd.read_csv(io.BytesIO(header + b)) for b in bodies]


def _dtype_of(value: Any):
    """The dtype ``DataFrame.assign(column=value)`` gives a column."""
    return pd.DataFrame(index=[0]).assign(v=value)["v"].dtype


def _frame(uri: str, experiment: str, sql: bool = True, local: bool = True) -> pd.DataFrame:
    """``runs_frame`` with its shortcuts switchable: SQL run lookup, in-place artifact reads."""
    require_store(uri)  # asking MLflow about a missing SQLite store would create an empty one
    path = _sqlite_path(uri) if sql else None
    found = _runs_sql(path, experiment) if path else None
    if found is None:
        from mlflow.tracking import MlflowClient

        exp_id = find_experiment_id(uri, experiment)  # StoreError for a store that cannot be read
        if exp_id is None:
            raise LookupError(f"no experiment named '{experiment}' in {uri}")
        with store_errors(uri):
            best = _runs_client(MlflowClient(uri), exp_id)
    else:
        best = found[1]
    order = sorted(best)
    runs = [best[tid] for tid in order]
    if not runs:
        return pd.DataFrame(columns=ID_COLUMNS)
    blobs = _tables(uri, runs, local)
    splits = [_split(b) for b in blobs]
    headers, _ = pd.factorize(pd.Series([sp[0] if sp else None for sp in splits], dtype=object))
    columns = _columns(experiment, order, runs)

    # Runs alike in table header and in which identity and settings columns they have, with
    # which Python types, make one group, built as the per-run loop would build each of them.
    signature = np.column_stack([headers] + [types for _, types in columns.values()])
    _, first, group_of = np.unique(signature, axis=0, return_index=True, return_inverse=True)
    group_of = group_of.ravel()
    dtypes: dict[tuple[str, int], Any] = {}
    parts, positions = [], []
    for g in np.argsort(first, kind="stable"):
        members = np.flatnonzero(group_of == g)
        split = splits[members[0]]
        if split is None:
            tables = [pd.DataFrame([_PLACEHOLDER]) for _ in members]
        else:
            tables = _read_group(split[0], [splits[i][1] for i in members])
        if isinstance(tables, pd.DataFrame):
            table = tables
            lengths = [splits[i][1].count(b"\n") for i in members]
        else:
            lengths = [len(t) for t in tables]
            table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
        rows_of = np.repeat(np.arange(len(members)), lengths)
        assigned = {}
        for key, (values, types) in columns.items():
            kind = int(types[members[0]])
            if kind == _ABSENT:
                continue
            dtype = dtypes.get((key, kind))
            if dtype is None:
                dtype = dtypes[(key, kind)] = _dtype_of(values[members[0]])
            assigned[key] = pd.Series(values[members], dtype=dtype).array.take(rows_of)
        parts.append(table.assign(**assigned))
        positions.append(np.repeat(members, lengths))
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    # Back to one run after the other, each run's rows in file order.
    frame = frame.iloc[np.argsort(np.concatenate(positions), kind="stable")].reset_index(drop=True)
    return _ordered(frame)


_ABSENT = -1
_TYPE_CODES: dict[type, int] = {}


def _type_codes(values: list) -> np.ndarray:
    return np.fromiter((_TYPE_CODES.setdefault(type(v), len(_TYPE_CODES)) for v in values), dtype=np.int64,
                       count=len(values))


def _columns(experiment: str, order: list[str], runs: list[_Run]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Identity and settings columns in the per-run loop's order: per run, the value and its type's code."""
    ident = {"sweep": [experiment] * len(runs), "trial_id": order, "run_id": [r.run_id for r in runs],
             "run_name": [r.tags.get("mlflow.runName", "") for r in runs], "status": [r.status for r in runs],
             "error": [r.tags.get("error") for r in runs]}
    out = {}
    for key, values in ident.items():
        array = np.empty(len(values), dtype=object)
        array[:] = values
        out[key] = (array, _type_codes(values))
    raw = pd.DataFrame.from_records([r.params for r in runs])
    for key in sorted(raw.columns):
        # Typed once per distinct text, not once per run.
        codes, texts = pd.factorize(raw[key].astype(object))
        typed = [_typed(key, t) for t in texts]
        array = np.empty(len(typed) + 1, dtype=object)
        array[:len(typed)] = typed
        kinds = np.append(_type_codes(typed), _ABSENT)
        out[key] = (array[codes], kinds[codes])  # code -1: the run has no such param
    return out


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in ID_COLUMNS if c in frame] + [c for c in SETTINGS if c in frame]
    return frame[first + [c for c in frame.columns if c not in first]]


def runs_frame(uri: str, experiment: str) -> pd.DataFrame:
    """Tidy rows of one experiment (sweep) in the store at ``uri``."""
    return _frame(uri, experiment)


def load(items: Iterable[str | tuple[str, str]], tracking_uri: str | None = None) -> pd.DataFrame:
    """Tidy rows of several sweeps in one frame: sweep files, experiment names or (uri, experiment) pairs.

    A sweep file's store is chosen as ``sweep run`` chooses it (``tracking_uri``, then
    MLFLOW_TRACKING_URI, then its ``tracking``); a bare name is looked up in ``tracking_uri``
    (or MLFLOW_TRACKING_URI, or ./mlflow.db). Raises LookupError for an unknown experiment,
    StoreError (one line) for a store that is missing or cannot be read.
    """
    frames = []
    for item in items:
        if isinstance(item, tuple):
            uri, name = item
        elif Path(item).is_file():
            from runner.spec import load_spec

            spec = load_spec(item)
            name, uri = spec.name, resolve_uri(tracking_uri, spec.tracking)
        else:
            name, uri = item, resolve_uri(tracking_uri)
        frames.append(runs_frame(uri, name))
    filled = [f for f in frames if len(f)]
    if not filled:
        return frames[0] if frames else pd.DataFrame(columns=ID_COLUMNS)
    return _ordered(pd.concat(filled, ignore_index=True) if len(filled) > 1 else filled[0])


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet columns have one type: a column mixing texts and numbers (a setting such as
    prune.iterations holding 0 and "none") is written as text, gaps kept."""
    import pyarrow as pa

    mixed = {}
    for col in frame.columns[frame.dtypes == object]:
        try:
            pa.array(frame[col], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            mixed[col] = frame[col].map(lambda v: v if v is None or v != v else str(v))
    return frame.assign(**mixed) if mixed else frame


def export(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a frame as CSV or Parquet, chosen by the file extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        _parquet_safe(frame).to_parquet(path, index=False)
    else:
        # pyarrow writes the 200,000-row frames of big sweeps about 10x faster than to_csv;
        # the text is the same but for whole floats ("2" for 2.0), which CSV cannot type anyway.
        import pyarrow as pa
        import pyarrow.csv as pa_csv

        pa_csv.write_csv(pa.Table.from_pandas(_parquet_safe(frame), preserve_index=False), path)
    return path
