"""A labelled held-out set for the learned task router: prompts written for the test, none of
them among the built-in examples (``app/route_examples.py``); the long-document prompts carry
real multi-paragraph documents."""

from __future__ import annotations

_REPORT = (
    "Annual operations review. The logistics division handled 4.2 million parcels this year, up eleven percent, "
    "while the average delivery time fell from 2.9 to 2.4 days. Two new sorting centres opened in the north, and "
    "the older facility in the harbour district was converted to cold storage for the grocery partners. Staff "
    "turnover remained high among seasonal drivers, which raised training costs by roughly a fifth. "
) * 8
_STORY = (
    "The lighthouse keeper had kept a diary for forty years, and on the morning the ship ran aground he wrote only "
    "three words. His daughter, who had returned from the city after a long silence, found the diary under the "
    "stairs and began reading from the first page, where the ink had faded to the colour of weak tea. "
) * 9
_MINUTES = (
    "Item 4. The committee reviewed the proposal to extend library opening hours. Ms Okafor reported that weekend "
    "attendance doubled during the pilot. Mr Lindqvist raised concerns about staffing and security costs. After "
    "discussion the committee agreed to continue the pilot for six months and to report back in September. "
) * 8
_LOG = "".join(
    f"2026-04-0{1 + i % 9} 12:{i % 60:02d}:07 WARN pool exhausted, waiting for connection (active=50 idle=0 waiters={i})\n" for i in range(45)
) + "2026-04-09 12:59:59 ERROR worker 7 killed by OOM killer\n"
_PAPER = (
    "Abstract. We study the convergence of stochastic gradient descent on non-convex objectives under heavy-tailed "
    "noise. Section 2 reviews related work on adaptive step sizes. Section 3 states our assumptions and proves a "
    "high-probability bound. Section 4 reports experiments on image classification and language modelling. "
) * 8
_POLICY = (
    "3.2 Remote work. Employees may work remotely up to three days per week with their manager's approval. "
    "Equipment provided by the company remains company property and must be returned on request. Expenses for "
    "home internet are reimbursed up to a monthly limit set by the finance department each January. "
) * 8

CODE = [
    "Write a Python script that renames all .jpeg files in a folder to .jpg",
    "How do I reverse a linked list in place in C?",
    "This Flask route returns 500 when the JSON body is empty, how should I validate it?",
    "Write a TypeScript function that debounces another function",
    "Explain the difference between let, const and var in JavaScript with code examples",
    "Implement quicksort in Haskell",
    "Write a Terraform module that creates an S3 bucket with versioning enabled",
    "My Python asyncio program hangs at await queue.get(), what could cause it?",
    "Write a regular expression that matches IPv4 addresses",
    "Create a Redis-backed rate limiter in Node.js",
    "Convert this for loop into a list comprehension: result = []\nfor x in data:\n    if x > 0:\n        result.append(x * 2)",
    "Why am I getting 'undefined is not a function' when calling map on this object?",
    "Write a CUDA kernel that adds two vectors",
    "Implement Dijkstra's algorithm in Python using heapq",
    "Write a Swift struct for a to-do item that conforms to Codable",
    "How do I set up a Python virtual environment and install requirements?",
    "Add error handling to this Go function that reads a JSON config file",
    "Write a PostgreSQL trigger that updates an updated_at column on every row change",
    "What is wrong with this code: for (int i = 0; i <= arr.length; i++) sum += arr[i];",
    "Write a cron expression that runs a job every weekday at 6:30 am and explain it",
    "Implement a thread-safe singleton in Java",
    "Write a NumPy function that normalizes each row of a matrix",
    "My git rebase has conflicts in package-lock.json, how do I resolve them?",
    "Write a React hook that fetches data and handles loading and error states",
    "Parse command line arguments in Rust with clap, with a --verbose flag",
    "Write an nginx config that proxies /api to a backend on port 8080",
    "Generate Python code to train a logistic regression with scikit-learn and print the accuracy",
    "Write a function in Elixir that counts word frequencies in a string",
    "How do I profile memory usage of a Python program?",
    "Write a Makefile with build, test and clean targets for a C project",
]

REASONING = [
    "Should a small bakery raise prices by 10% or cut costs to survive rising flour prices? Think it through.",
    "Prove that there are infinitely many prime numbers",
    "If a doctor gives you three pills and tells you to take one every half hour, how long until they run out? Explain.",
    "What are the likely consequences for Europe's energy security of phasing out nuclear power early?",
    "Is it better to pay off student loans early or invest in an index fund? Analyze both options.",
    "Two fair coins are flipped; given that at least one is heads, what is the probability both are heads? Show the reasoning.",
    "Evaluate the claim that social media has made people less happy, weighing the evidence",
    "How should a hospital prioritize patients in an emergency room during a mass casualty event? Reason about the principles.",
    "A farmer must cross a river with a wolf, a goat and a cabbage; explain the solution step by step",
    "Compare the strengths and weaknesses of democracy and technocracy",
    "Our server costs doubled while traffic stayed flat; reason through the possible causes and how to tell them apart",
    "Show that every continuous function on a closed interval is bounded",
    "What strategic options does a newspaper have as print advertising declines? Assess each.",
    "Why do prices rise when central banks print money? Walk through the mechanism.",
    "Determine the minimum number of weighings needed to find the one heavier ball among nine, and justify it",
    "Weigh the arguments for and against lowering the voting age to 16",
    "How would you decide whether to build or buy a payroll system for a 300-person company?",
    "If every person on Earth jumped at the same moment, what would happen? Estimate the physics.",
    "Explain why the Monty Hall problem favors switching, with a rigorous argument",
    "A startup has 18 months of runway and growth is slowing. Lay out a decision framework for the next quarter.",
    "What factors explain why some countries industrialized earlier than others?",
    "Derive the formula for the sum of a geometric series",
    "Is a hot dog a sandwich? Construct the strongest argument on each side and reach a conclusion.",
    "Figure out which of these three suspects is lying, given their statements, and explain the deduction",
    "Analyze whether nuclear fusion is likely to be commercially viable by 2050",
    "Evaluate the risks and benefits of giving AI systems autonomous control of power grids",
    "Calculate how long it takes to pay off a $20,000 loan at 6% interest with $400 monthly payments, step by step",
    "Why might increasing the minimum wage reduce or increase employment? Consider both theories.",
    "Plan the order of tasks for renovating a kitchen so that nothing has to be redone, explaining dependencies",
    "Given that a test is 99% accurate and the disease affects 1 in 10,000, what is the chance a positive result is real? Reason carefully.",
]

LONG = [
    "Summarize this annual review for the board in half a page.\n\n" + _REPORT,
    "List every number mentioned in the report below and what it measures.\n\n" + _REPORT,
    "What were the division's main problems this year according to the following text?\n\n" + _REPORT,
    "Turn this report into a slide outline with one slide per paragraph.\n\n" + _REPORT,
    "Write a summary of the story below and identify its main themes.\n\n" + _STORY,
    "Extract the names of all characters and places from this text.\n\n" + _STORY,
    "Rewrite the following passage for a children's book, keeping the plot.\n\n" + _STORY,
    "Answer using only the passage: why did the daughter come back?\n\n" + _STORY,
    "Summarize the decisions recorded in these committee minutes.\n\n" + _MINUTES,
    "Who raised objections in the minutes below, and about what?\n\n" + _MINUTES,
    "Produce a list of follow-up tasks from these meeting minutes.\n\n" + _MINUTES,
    "Draft an email to staff explaining the outcome of the meeting described here.\n\n" + _MINUTES,
    "Read this server log and tell me why the worker died.\n\n" + _LOG,
    "Summarize the warnings in the following log excerpt and suggest what to check.\n\n" + _LOG,
    "Count how many warnings appear in this log and when they started.\n\n" + _LOG,
    "Write a plain-language summary of this paper for a newsletter.\n\n" + _PAPER,
    "What are the paper's contributions, section by section?\n\n" + _PAPER,
    "Generate five exam questions from the following paper text.\n\n" + _PAPER,
    "Does the paper below report experiments on speech recognition? Quote the relevant part.\n\n" + _PAPER,
    "Summarize this policy section for new employees.\n\n" + _POLICY,
    "Can I work from home four days a week under the policy below? Answer from the text.\n\n" + _POLICY,
    "Convert the following policy text into a FAQ with at least five questions.\n\n" + _POLICY,
    "Here is a long document. Give me the three most important points.\n\n" + _REPORT + _MINUTES,
    "Translate the following text into Spanish.\n\n" + _POLICY,
    "Identify any contradictions between the two documents below.\n\n" + _POLICY + "\n\n---\n\n" + _REPORT,
]

GENERAL = [
    "good evening! what's up?",
    "translate 'where is the train station' into Italian",
    "What is the tallest mountain in Africa?",
    "Give me an easy pancake recipe",
    "Write a short congratulations message for a coworker's promotion",
    "How many days are there in a leap year?",
    "Suggest a name for my new houseplant",
    "Make this sound friendlier: your request has been denied",
    "Who painted the Mona Lisa?",
    "How many centimeters in an inch?",
    "Tell me something interesting about penguins",
    "Recommend a podcast about history",
    "Write a limerick about a sleepy dog",
    "ok great, thank you so much",
    "Correct the grammar: him and me goes to the store yesterday",
    "What does the word 'ephemeral' mean?",
    "What are some good board games for four players?",
    "How long should I steep green tea?",
    "Write an Instagram caption for a beach photo",
    "What's the difference between a crocodile and an alligator?",
    "Any tips for falling asleep faster?",
    "What is the currency of Switzerland?",
    "How do you say thank you in Japanese?",
    "What's the freezing point of water in Fahrenheit?",
    "Write a two-line poem for a wedding card",
    "Suggest a weekend trip near Barcelona",
    "Which planet is closest to the sun?",
    "Give me a motivational quote for Monday morning",
    "How many ounces are in a cup?",
    "Write a short out-of-office reply for my holiday",
]

HELD_OUT: list[tuple[str, str]] = [
    *((p, "code") for p in CODE),
    *((p, "reasoning") for p in REASONING),
    *((p, "long") for p in LONG),
    *((p, "general") for p in GENERAL),
]
