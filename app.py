"""jointcomp's app: compress a network to a size budget, live.

    streamlit run app.py

The pages live in pages/; this entry point names them for the sidebar.
"""
import streamlit as st

PAGES = [
    st.Page("pages/0_Compress.py", title="Compress", default=True),
    st.Page("pages/1_Sweep.py", title="Sweep"),
    st.Page("pages/2_Inspect.py", title="Inspect"),
    st.Page("pages/3_Runs.py", title="Runs"),
]
st.navigation(PAGES).run()
