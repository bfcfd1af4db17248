// mqueue dashboard: asks before destructive actions. Everything else works without JavaScript.
document.addEventListener("submit", function (event) {
  var question = event.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
