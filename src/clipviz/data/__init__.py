"""Inputs: robust image loading (`images`), the files of a run (`inputs`), WebDataset shards
(`shards`), image–caption sets for ECLIP training (`captions`) and evaluation datasets
(`datasets`)."""
