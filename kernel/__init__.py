"""kernel: the supervisor, workers, scheduler and actors (built by the kernel issue)."""
