// Allure 3 configuration for scripts/allure-report: where the report goes and where the
// history lives, so trends carry from one generated report to the next.
import { defineConfig } from "allure";

export default defineConfig({
  name: "lorabench",
  output: "./reports/allure-report",
  historyPath: "./reports/allure-history.jsonl",
  plugins: {
    awesome: {
      options: {
        reportName: "lorabench",
        reportLanguage: "en",
        groupBy: ["parentSuite", "suite", "subSuite"],
      },
    },
  },
});
