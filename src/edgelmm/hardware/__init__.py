"""Hardware: device profiles (`profiles`) and memory / roofline planning on them (`planning`)."""

from edgelmm.hardware.planning import Plan, format_plan, plan, plan_from_path, roofline_decode_tok_s
from edgelmm.hardware.profiles import guess_profile, list_profiles, load_profile, peak_16bit_flops

__all__ = [
    "Plan", "format_plan", "guess_profile", "list_profiles", "load_profile", "peak_16bit_flops", "plan", "plan_from_path",
    "roofline_decode_tok_s",
]
