"""jointcomp's app: compress a network to a size budget, live.

    streamlit run app.py

The pages live in pages/ (listed in ui.PAGES); each draws the page menu itself (ui.page_menu).
"""
import streamlit as st

import ui
from jointcomp.allocator import keep_freed_blocks

keep_freed_blocks()  # every rerun: two calls into the C library

pages = [st.Page(path, title=title, default=i == 0) for i, (path, title) in enumerate(ui.PAGES.items())]
st.navigation(pages, position="hidden").run()
