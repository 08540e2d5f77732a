"""The training phase: architectures, losses, the batch loader, the schedule, distributed ranks and the loop (stage train)."""
