"""The scheduled re-ranking: rank the corpora again, then record tonight's ranking in the history.

Unchanged corpora are served from the content-addressed cache, so a night retrains only the
corpora that are new or whose content changed.
"""

import datetime as dt
from zoneinfo import ZoneInfo

from prefect import flow
from prefect.runtime import flow_run

from flows.rank import rank_corpora
from rbridge_core.config import RankConfig
from tasks.history import append_history


def _night(timezone: str) -> dt.date:
    """The date this run was scheduled for, in the schedule's timezone (now, if unscheduled)."""
    start = flow_run.get_scheduled_start_time() or dt.datetime.now(dt.UTC)
    return start.astimezone(ZoneInfo(timezone)).date()


@flow(name="nightly-ranking")
def nightly_ranking(config: RankConfig, timezone: str = "UTC") -> dict:
    """Re-rank the corpora and append the ranking to OUTPUT/history (rankings + rank drift)."""
    manifest = rank_corpora(config)
    rankings, drift = append_history(config.output, manifest["run"], _night(timezone))
    return {"run": manifest["run"], "history": rankings, "rank_drift": drift}
