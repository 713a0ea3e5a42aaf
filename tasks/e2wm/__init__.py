"""E2WM's experience tasks (Xiang et al. 2023): plan generation, activity recognition, counting and
object path tracking from the household world, their evaluation sets, and regenerated bAbI-style
tasks."""
