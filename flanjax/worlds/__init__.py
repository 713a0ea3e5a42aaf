"""World models as pure JAX (E2WM, Xiang et al. 2023): a household simulator, the activities
registry, a batched MCTS planner and random exploration. Experiences become text in
`tasks/e2wm/`."""
