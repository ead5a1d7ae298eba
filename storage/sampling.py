"""Curves drawn from a bounded number of points, chosen by the database itself.

A chart needs a few hundred to a few thousand points a series whatever the run logged, so a series of n points is cut
into at most `buckets` equal ranges of steps and each range comes back as one `SampledPoint`: its last point (the line
a user reads), and its minimum and maximum (the band, so a spike inside a bucket never disappears). This is what the
hosted trackers draw (bucketed min/max) rather than a reservoir, because a reservoir drops spikes by chance.

One query for any number of runs and names, on SQLite and PostgreSQL alike: a grouped pass computes each series'
step range, a second groups the points by bucket (integer arithmetic, so both databases cut at the same steps), and a
join on the (run, name, step) unique index fetches each bucket's last point. A series with no more points than
`buckets` comes back whole, one bucket a point, with min = max = value.
"""
from __future__ import annotations

from typing import Optional

from sqlalchemy import BigInteger, Select, and_, case, cast, func, literal, select

from storage.models import MetricPoint

DEFAULT_BUCKETS = 1500
MAX_BUCKETS = 20_000


def check_buckets(buckets: int) -> int:
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= MAX_BUCKETS:
        raise ValueError(f"buckets must be a whole number from 1 to {MAX_BUCKETS}, got {buckets!r}")
    return buckets


def sampled_query(run_ids: list[str], names: Optional[list[str]], buckets: int,
                  step_range: Optional[tuple[int, int]] = None) -> Select:
    """Rows (run_id, name, bucket, step, value, epoch, tokens, time, low, high, count), ordered by run, name, step.

    `step_range` (first, last), inclusive, samples only that part of each series: a zoom refetches its range at
    full resolution whenever the range holds no more than `buckets` points.
    """
    points = MetricPoint.__table__
    where = [points.c.run_id.in_(run_ids)]
    if names is not None:
        where.append(points.c.name.in_(names))
    if step_range is not None:
        where += [points.c.step >= step_range[0], points.c.step <= step_range[1]]
    bounds = (select(points.c.run_id, points.c.name, func.min(points.c.step).label("lo"),
                     func.max(points.c.step).label("hi"), func.count().label("n"))
              .where(*where).group_by(points.c.run_id, points.c.name).subquery("bounds"))
    # bucket = (step - lo) * buckets // (hi - lo + 1): 64-bit, since 10^7 steps × 20k buckets overflows int4
    offset = cast(points.c.step - bounds.c.lo, BigInteger) * literal(buckets, BigInteger)
    bucket = case((bounds.c.n <= buckets, cast(points.c.step, BigInteger)),
                  else_=offset // cast(bounds.c.hi - bounds.c.lo + 1, BigInteger)).label("bucket")
    grouped = (select(points.c.run_id, points.c.name, bucket, func.max(points.c.step).label("last_step"),
                      func.min(points.c.value).label("low"), func.max(points.c.value).label("high"),
                      func.count().label("count"))
               .select_from(points.join(bounds, and_(points.c.run_id == bounds.c.run_id,
                                                     points.c.name == bounds.c.name)))
               .where(*where).group_by(points.c.run_id, points.c.name, bucket).subquery("grouped"))
    last = points.alias("last")
    return (select(grouped.c.run_id, grouped.c.name, grouped.c.bucket, last.c.step, last.c.value, last.c.epoch,
                   last.c.tokens, last.c.time, grouped.c.low, grouped.c.high, grouped.c["count"])
            .select_from(grouped.join(last, and_(last.c.run_id == grouped.c.run_id, last.c.name == grouped.c.name,
                                                 last.c.step == grouped.c.last_step)))
            .order_by(grouped.c.run_id, grouped.c.name, last.c.step))
