// End-to-end suites live here; see README "Tests".
export {}
