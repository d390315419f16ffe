"""magicgui's ``Table``, filled without a Python call per cell on the GUI thread's signal path.

magicgui's own ``Table.value = ...`` sets cell by cell, and each cell fires ``itemChanged`` into
a Python slot that re-parses the text: 0.5 s for the 1000 x 9 table of a 1000² tile's nuclei,
all of it on the GUI thread. Here the cells are made with signals blocked and the value kept
as it came (a float stays a float), and long tables are filled a slice of rows per event-loop
turn, so the viewer keeps drawing while a few thousand nuclei arrive.
"""

from __future__ import annotations

from magicgui.widgets import Table

DATA_ROLE = 255  # where magicgui's Qt backend keeps a cell's value (``_DATA_ROLE``); ``.value`` reads it
ROW_PADDING_PX = 8  # above and below a row's line of text
ROWS_PER_STEP = 150  # rows added per event-loop turn: ~15 ms on 2 idle cores for 9 columns


class FastTable(Table):
    """A magicgui ``Table`` whose ``value`` setter is fast; ``fill(value, in_steps=True)`` spreads
    a long table over event-loop turns (``filling`` says whether rows are still arriving)."""

    _fill_generation = 0
    filling = False
    _filled: tuple | None = None  # (data, index, columns) as last given, in their own order
    _sorted_by: tuple[str, bool] | None = None  # (column name, descending) chosen with a header click

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # rows a line of text high: napari's style gives the row headers button height (30 px),
        # and a dock showed four classes where it has room for six
        rows = self.native.verticalHeader()
        rows.setDefaultSectionSize(self.native.fontMetrics().lineSpacing() + ROW_PADDING_PX)

    def set_value(self, value) -> None:
        self.fill(value, in_steps=False)

    def enable_sorting(self) -> None:
        """A click on a column's header sorts the rows by it (numbers as numbers, 9 before 10),
        again the other way round; each row keeps its header (a nucleus its id). The order stays
        for the next fill that has that column. Qt's own sorting is not used: it compares the
        cells' text, and moves rows while a long table is still arriving."""
        from qtpy.QtCore import Qt

        header = self.native.horizontalHeader()
        header.setSectionsClickable(True)
        header.setSortIndicatorShown(True)
        header.setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        header.sectionClicked.connect(self.sort_by)

    def sort_by(self, column: int | str, descending: bool | None = None) -> None:
        """Rows ordered by ``column`` (its index or name); ``descending`` ``None``: the other way
        round when it is already the sorted column, else ascending."""
        if self._filled is None:
            return
        columns = list(self._filled[2])
        if isinstance(column, int) and not 0 <= column < len(columns):
            return
        name = columns[column] if isinstance(column, int) else column
        if name not in columns:
            return
        if descending is None:
            descending = self._sorted_by == (name, False)
        self._sorted_by = (name, descending)
        self.fill(dict(zip(("data", "index", "columns"), self._filled)), in_steps=len(self._filled[0]) > ROWS_PER_STEP)

    def _in_chosen_order(self, data: list, index: list, columns: list) -> tuple[list, list, int, bool]:
        """The rows (and their headers) in the order chosen, the sorted column (-1: none) and its direction."""
        if self._sorted_by is None or self._sorted_by[0] not in columns:
            return data, index, -1, False
        name, descending = self._sorted_by
        c = columns.index(name)
        order = sorted(range(len(data)), key=lambda r: _sort_key(data[r][c]), reverse=descending)
        return [data[r] for r in order], [index[r] for r in order] if len(index) else index, c, descending

    def fill(self, value, in_steps: bool = True) -> None:
        from magicgui.widgets._table import normalize_table_data
        from qtpy.QtCore import QTimer, Qt

        data, index, columns = normalize_table_data(value)
        data, index, columns = [list(row) for row in data], list(index), list(columns)
        self._filled = (data, index, columns)
        data, index, sorted_column, descending = self._in_chosen_order(data, index, columns)
        self._fill_generation += 1  # a newer fill stops an older one's remaining steps
        generation = self._fill_generation
        q = self.native
        with _quiet(q):
            q.clearContents()
            # the old rows' and columns' headers go too: magicgui refuses new headers of another
            # length than the header items still there (a table of 4 columns grown to 7 kept 4)
            q.setRowCount(0)
            q.setColumnCount(0)
            q.setRowCount(len(data))
            q.setColumnCount(len(columns) if len(columns) else (len(data[0]) if data else 0))
            if len(columns):
                self.column_headers = tuple(columns)
            if len(index):
                self.row_headers = tuple(index)
            q.horizontalHeader().setSortIndicator(sorted_column, Qt.SortOrder.DescendingOrder if descending
                                                  else Qt.SortOrder.AscendingOrder)
        if not in_steps or len(data) <= ROWS_PER_STEP:
            self._put_rows(data, 0, len(data))
            self.filling = False
            return
        self.filling = True

        def step(start: int = 0) -> None:
            if generation != self._fill_generation:
                return
            stop = min(start + ROWS_PER_STEP, len(data))
            try:
                self._put_rows(data, start, stop)
            except RuntimeError:  # the dock was closed while rows were arriving
                return
            if stop < len(data):
                QTimer.singleShot(0, lambda: step(stop))
            else:
                self.filling = False

        step()

    def _put_rows(self, data: list, start: int, stop: int) -> None:
        from qtpy.QtWidgets import QTableWidgetItem

        q = self.native
        with _quiet(q):
            for r in range(start, stop):
                for c, v in enumerate(data[r]):
                    if v is None:
                        continue
                    item = QTableWidgetItem(str(v))
                    item.setData(DATA_ROLE, v)
                    q.setItem(r, c, item)


def _sort_key(value) -> tuple:
    """Numbers by value, text by text, empty cells last (whichever the direction, nearly)."""
    if value is None:
        return (2, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "") if value == value else (2, 0, "")  # NaN with the empty cells
    return (1, 0, str(value))


class _quiet:
    """No signals and no repaint while the cells change; one repaint after."""

    def __init__(self, q):
        self.q = q

    def __enter__(self):
        self.signals = self.q.blockSignals(True)
        self.q.setUpdatesEnabled(False)

    def __exit__(self, *exc):
        self.q.setUpdatesEnabled(True)
        self.q.blockSignals(self.signals)
