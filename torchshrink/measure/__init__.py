from torchshrink.measure.counts import count_macs, count_nonzero, count_params
from torchshrink.measure.latency import Timing, measure_latency, threads, time_interleaved
from torchshrink.measure.quality import accuracy, fidelity
from torchshrink.measure.report import Measurement, compare, compare_markdown, compare_table, measure

__all__ = [
    "Measurement", "Timing", "accuracy", "compare", "compare_markdown", "compare_table", "count_macs",
    "count_nonzero", "count_params", "fidelity", "measure", "measure_latency", "threads", "time_interleaved",
]
