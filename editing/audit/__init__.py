"""How well an edit holds: concept presence read from the model itself (`presence`), the resurgence
audit under benign fine-tuning (`resurgence`), and a classifier harness for the tiny world (`evaluate`)."""

