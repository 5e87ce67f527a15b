"""stratamesh: an event-driven AI inference mesh."""
