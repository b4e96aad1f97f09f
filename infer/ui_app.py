"""The Streamlit script of ``python -m infer ui`` (``streamlit run infer/ui_app.py -- --adapter A ...``).

Arguments: see :func:`infer.ui.parse_app_args` (the command line after ``--``, or ``$QLML_UI_ARGS``). All logic
lives in :mod:`infer.ui`; this file only lays out the page.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

try:
    import infer.ui  # noqa: F401
except ImportError:  # `streamlit run infer/ui_app.py` from a checkout: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import streamlit as st

from core.errors import ConfigError, InputError
from core.sets import is_sets
from infer.ui import Backend, chart, form_fields, parse_app_args, result_frame, row_prompt, score_csv, validate


@st.cache_resource(show_spinner="loading the model ...")
def get_backend(key: str, _cfg) -> Backend:
    """One backend per distinct configuration (``key``), shared by every session of this server."""
    return Backend.create(_cfg)


def main() -> None:
    st.set_page_config(page_title="qlora-multilabel", layout="wide")
    try:
        cfg = parse_app_args()
        backend = get_backend(repr(cfg), cfg)
    except (InputError, ConfigError) as e:
        st.error(f"error: {e}")
        st.stop()
    ref = backend.ref
    fields = form_fields(ref, allow_empty=cfg.allow_empty)
    template = ref.cfg.data.text_template
    st.title("Multilabel tagger")
    where = f"server {cfg.api}" if cfg.api else "in this process"
    st.caption(f"adapter `{cfg.adapter}` ({len(ref.label_names)} classes), model {where}; decoding: "
               f"{'thresholds ' + cfg.thresholds if cfg.thresholds else 'cascade 0.55 .. 0.20, default'}")
    one, many = st.tabs(["One text", "Score a CSV"])
    with one:
        single(backend, fields, template, cfg)
    with many:
        batch(backend, cfg)


def single(backend: Backend, fields, template: str, cfg) -> None:
    values = {}
    with st.form("row"):
        for f in fields:
            if f.kind == "number":
                values[f.name] = st.number_input(f.name, min_value=f.min_value, max_value=f.max_value,
                                                 value=f.default, step=f.step, key=f"field_{f.name}")
            elif f.kind == "multiselect":
                values[f.name] = st.multiselect(f.name, f.options, key=f"field_{f.name}")
            else:
                values[f.name] = st.text_area(f.name, max_chars=None, key=f"field_{f.name}",
                                              help=f"at most {cfg.max_text_chars} characters"
                                                   + ("" if f.required else "; may be empty"))
        submitted = st.form_submit_button("Predict")
    if not submitted:
        result = st.session_state.get("result")
        if result is None:
            return
    else:
        errors = validate(fields, values, cfg.max_text_chars)
        if errors:
            for e in errors:
                st.error(e)
            st.session_state["result"] = None
            return
        try:
            probs, preds = backend.score([values])
        except InputError as e:
            st.error(f"error: {e}")
            return
        frame = result_frame(probs[0], preds[0], backend.spec, backend.ref.descriptions)
        result = {"prompt": row_prompt(template, values, backend.ref.field_kinds), "frame": frame}
        st.session_state["result"] = result
    frame = result["frame"]
    chosen = frame[frame["predicted"]]
    st.subheader("Predicted classes")
    st.markdown("\n".join(f"- **{r.name}** (`{r.label}`, p = {r.probability:.3f})" for r in chosen.itertuples())
                or "_none_")
    spec = backend.spec
    if not is_sets(spec) and spec.fallback is not None and frame["probability"].max() <= spec.steps[-1] + (
            0 if spec.class_offsets is None else min(spec.class_offsets)):
        st.caption(f"no class is above the lowest threshold {spec.steps[-1]:g}: the fallback class "
                   f"`{spec.label_names[spec.fallback]}` is predicted")
    st.pyplot(chart(frame, backend.spec), clear_figure=True)
    with st.expander("probabilities and prompt"):
        st.dataframe(frame, hide_index=True)
        st.code(result["prompt"], language=None)


def batch(backend: Backend, cfg) -> None:
    from infer.submit import submission_frame

    data = backend.ref.cfg.data
    upload = st.file_uploader(f"CSV with the columns {data.id_column} and "
                              f"{', '.join(f.name for f in form_fields(backend.ref))}", type=["csv"])
    if upload is None:
        return
    try:
        df = pd.read_csv(io.BytesIO(upload.getvalue()))
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds
        st.error(f"{upload.name}: cannot read CSV: {e}")
        return
    if data.id_column not in df.columns or df[data.id_column].isna().any() or df[data.id_column].duplicated().any():
        st.error(f"{upload.name}: needs an id column {data.id_column!r} without empty or duplicate values")
        return
    key = (upload.name, upload.size, upload.file_id if hasattr(upload, "file_id") else None)
    if st.session_state.get("csv_key") != key:
        bar = st.progress(0.0, text=f"scoring {len(df)} rows")
        try:
            probs, preds = score_csv(backend, df, cfg.batch_size,
                                     progress=lambda done, n: bar.progress(done / n, text=f"{done} / {n} rows"))
        except InputError as e:
            st.error(f"{upload.name}: {e}")
            return
        names = backend.label_names
        probs_df = pd.DataFrame(probs, columns=names)
        probs_df.insert(0, data.id_column, df[data.id_column].to_numpy())
        sub = submission_frame(data.id_column, df[data.id_column].to_numpy(), preds, names, data.submission_format)
        st.session_state["csv_key"] = key
        st.session_state["csv_out"] = {"probs": probs_df.to_csv(index=False, float_format="%.6f"),
                                       "submission": sub.to_csv(index=False), "rows": len(df), "preview": sub}
    out = st.session_state["csv_out"]
    st.success(f"scored {out['rows']} rows")
    st.dataframe(out["preview"].head(20), hide_index=True)
    st.download_button("probabilities CSV", out["probs"], file_name="probs.csv", mime="text/csv")
    st.download_button("submission CSV", out["submission"], file_name="submission.csv", mime="text/csv")


main()
