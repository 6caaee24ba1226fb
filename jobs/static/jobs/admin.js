// Parroter's additions to every admin page. Runs in <head>, before the admin's own scripts.
"use strict";
(function () {
  // On a laptop screen the lists need the width: the navigation sidebar (the same links as
  // the admin's home page) starts closed there until the person opens it with its « toggle,
  // which the admin then remembers under this key.
  const key = "django.admin.navSidebarIsOpen";
  try {
    if (localStorage.getItem(key) === null && window.innerWidth < 1600) {
      localStorage.setItem(key, "false");
    }
  } catch (error) {
    // Storage switched off: the admin's default (open) applies.
  }
})();
