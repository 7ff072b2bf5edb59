"""Sample monitoring for real runs, where no modes are known: diversity and saturation statistics."""
