"""What the docs hooks render: entry pages, tables and pictures, all from the catalogue."""
