"""Few-shot evaluation: tasks, prompting with demonstrations, reference-exact metrics."""
