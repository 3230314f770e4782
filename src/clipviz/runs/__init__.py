"""Runs over many inputs: explaining (`explain`, `outputs`), ConVis concepts (`concepts`),
evaluation (`evaluate`, `eval_results`), timing (`bench`) and the HTML report (`report`).
Every run writes its files atomically and records each finished input as it goes."""
