"""Pipeline parallelism: one model split into contiguous stages across devices or hosts."""
