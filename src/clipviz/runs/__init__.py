"""Runs over many inputs: explaining folders (`explain`, `outputs`) and WebDataset shards
(`shards`), segmenting (`segment`), ConVis concepts (`concepts`), TextSpan's heads (`heads`),
evaluation (`evaluate`, `segment_eval`, `eval_results`), the randomisation test (`sanity`),
timing (`bench`) and the HTML reports (`report`, `shard_report`, `segment_report`,
`eval_report`). Every run is prepared the same way (`prepare`, `run_json`), writes its files
atomically and records each finished input as it goes (`manifest`)."""
