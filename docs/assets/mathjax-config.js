// MathJax 3 reads this before it loads; pymdownx.arithmatex (generic mode) marks the math.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
  // 10% above the text's own x-height: a formula with parentheses is then at least as tall as
  // the body text around it (checked in tests/test_browser.py at 400 and 1280 px).
  svg: { fontCache: "global", scale: 1.1 },
};
