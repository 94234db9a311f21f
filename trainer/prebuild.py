"""Build DeepSpeed's CPU shared-memory comm op once at install time (40-65 s), so that the
first `deepspeed.initialize` in a test or a run does not stall on a compile.
Run: `DS_ACCELERATOR=cpu python -m trainer.prebuild`."""

from __future__ import annotations


def main() -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)
    print("deepspeed shm comm op ready")


if __name__ == "__main__":
    main()
