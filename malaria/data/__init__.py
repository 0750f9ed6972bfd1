"""Data in: the competition's zip + CSV read into validated tables (`archive`), decoded once into a
memory-mapped cache (`cache`), split into holdouts and folds (`splits`), ordered resumably
(`sampling`), augmented (`augmentation`), their stain colour measured and standardised (`colour`)
and served by the LightningDataModule (`datamodule`); `demo` generates a synthetic competition for
a fresh clone."""
