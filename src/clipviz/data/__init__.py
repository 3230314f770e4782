"""Inputs: robust image loading (`images`), the files of a run (`inputs`), image–caption sets
for ECLIP training (`captions`) and evaluation datasets (`datasets`)."""
