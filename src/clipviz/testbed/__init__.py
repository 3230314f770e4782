"""The synthetic test bed: a world of coloured shapes on textured backgrounds with exact masks
(`world`), and a tiny CLIP and a tiny SigLIP trained on it for a minute (`tinyclip`,
`tinysiglip`). Not product code: tests, examples and the demo use it to check that maps mean
something."""
