"""DeepSpeed trainer and the TRRD / GRPO / KDRL losses."""
