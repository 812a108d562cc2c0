"""Assembly, layer 6: a recipe made into objects and back. `builders`: config -> model, optimizer, views, steps per
epoch. `artifacts`: the encoder a run leaves, saved and opened again (Keras file, checkpoint, SavedModel)."""
